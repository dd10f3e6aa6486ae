"""Helpers for tests that inspect traced programs."""


def iter_eqns(jaxpr):
    """Every equation of ``jaxpr``, recursing into sub-jaxprs (scan/while/cond/pjit/custom_vjp bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from iter_eqns(inner)
