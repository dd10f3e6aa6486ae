"""Layered LoRA: ``h = W0·x + s·U(M(D·x))`` with a meta-shared Meta-Down ``D`` and per-subject ``M``, ``U``.

See ``adapters`` for the math, init and scale; ``roles`` for parameter roles as types; ``subjects`` for
running many subjects in one call; ``merge`` for merging and parameter accounting.
"""

from metalora.lora.adapters import LoRAAdapter, LoRAConfig, LoRAConv, LoRALinear, iter_adapters
from metalora.lora.inject import TARGET_PRESETS, inject, remove, select_targets
from metalora.lora.merge import ParameterCount, count_parameters, merge_subject, merged_params, unmerge
from metalora.lora.roles import (
    BASE,
    META,
    ROLES,
    SUBJECT,
    MetaDownParam,
    SubjectParam,
    merge_roles,
    role_filter,
    split_roles,
)
from metalora.lora.subjects import (
    apply_indexed,
    apply_subjects,
    init_subject_state,
    num_subjects,
    reinit_subjects,
    take_heads,
    take_subject,
)

__all__ = [
    "BASE",
    "META",
    "ROLES",
    "SUBJECT",
    "TARGET_PRESETS",
    "LoRAAdapter",
    "LoRAConfig",
    "LoRAConv",
    "LoRALinear",
    "MetaDownParam",
    "ParameterCount",
    "SubjectParam",
    "apply_indexed",
    "apply_subjects",
    "count_parameters",
    "init_subject_state",
    "inject",
    "iter_adapters",
    "merge_roles",
    "merge_subject",
    "merged_params",
    "num_subjects",
    "reinit_subjects",
    "remove",
    "role_filter",
    "select_targets",
    "split_roles",
    "take_heads",
    "take_subject",
    "unmerge",
]
