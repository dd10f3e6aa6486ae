"""config_utils: the experiment CLI pattern (--config file.py:arg --workdir DIR --config.key=value), end to end."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import ml_collections
import pytest

from metalora.config_utils import ConfigError, config_to_json, load_config, parse_cli, run_cli, save_config

REPO = pathlib.Path(__file__).resolve().parents[1]

CONFIG_PY = textwrap.dedent(
    """
    import ml_collections

    def get_config(arg=None):
        c = ml_collections.ConfigDict()
        c.seed = 0
        c.steps = 6 if arg == "smoke" else 1000
        c.optimizer = ml_collections.ConfigDict({"learning_rate": 0.1, "warmup_steps": 1, "total_steps": c.steps})
        c.betas = (0.9, 0.999)
        c.use_ema = False
        return c
    """
)

# The tiny example CLI: the same shape as experiments/*.py (config → TrainLoop in workdir).
CLI_PY = textwrap.dedent(
    """
    import json

    import jax
    import jax.numpy as jnp
    import numpy as np

    from metalora.config_utils import run_cli
    from metalora.train import create_train_state, make_optimizer, make_train_step, train_loop


    class Data:
        def __init__(self):
            self.i = 0

        def __next__(self):
            x = np.random.default_rng(self.i).normal(size=(8, 2)).astype(np.float32)
            self.i += 1
            return {"x": x, "y": x @ np.array([[2.0], [-1.0]], np.float32)}

        def get_state(self):
            return {"i": self.i}

        def set_state(self, s):
            self.i = s["i"]


    def loss_fn(params, frozen, batch, key):
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}


    def main(config, workdir):
        tx = make_optimizer(config.optimizer)
        state = create_train_state({"w": jnp.zeros((2, 1))}, tx, ema=config.use_ema)
        final = train_loop(
            workdir=workdir, step_fn=make_train_step(loss_fn, tx, ema_decay=0.9 if config.use_ema else None),
            state=state, data=Data(), total_steps=config.steps, key=jax.random.key(config.seed), config=config,
            log_every=2, progress=False,
        )
        print(json.dumps({"step": int(final.step), "lr": config.optimizer.learning_rate, "ema": config.use_ema}))


    if __name__ == "__main__":
        run_cli(main)
    """
)


@pytest.fixture
def cli_dir(tmp_path):
    (tmp_path / "cfg.py").write_text(CONFIG_PY)
    (tmp_path / "train_cli_example.py").write_text(CLI_PY)
    return tmp_path


def run_cli_process(cwd, *args):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "train_cli_example", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_end_to_end_with_overrides(cli_dir):
    workdir = cli_dir / "run"
    proc = run_cli_process(
        cli_dir,
        "--config",
        "cfg.py:smoke",
        "--workdir",
        str(workdir),
        "--config.optimizer.learning_rate=0.05",
        "--config.use_ema",
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"step": 6, "lr": 0.05, "ema": True}
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["steps"] == 6 and saved["optimizer"]["learning_rate"] == 0.05 and saved["betas"] == [0.9, 0.999]
    assert (workdir / "checkpoints" / "6").is_dir()


def test_cli_unknown_key_fails_with_clear_message(cli_dir):
    proc = run_cli_process(cli_dir, "--config=cfg.py", "--workdir", str(cli_dir / "w"), "--config.optimizer.lr=1")
    assert proc.returncode == 2
    expected = (
        "error: --config.optimizer.lr=1: unknown config key 'optimizer.lr' in cfg.py; "
        "fields at config.optimizer: learning_rate, total_steps, warmup_steps"
    )
    assert expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (cli_dir / "w").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.optimizer.learning_rte=0.1", "unknown config key 'optimizer.learning_rte' in cfg.py"),
        ("--config.nope=1", "unknown config key 'nope' in cfg.py; fields at the top level of the config: betas,"),
        ("--noconfig.nope", "unknown config key 'nope'"),
        ("--config.seed.x=1", "'seed' in cfg.py is a value of type int, not a config group"),
        ("--config.steps=ten", "could not convert|invalid literal"),
    ],
)
def test_run_cli_bad_override_exits_2_with_message(cli_dir, monkeypatch, capsys, override, message):
    monkeypatch.chdir(cli_dir)
    called = []
    with pytest.raises(SystemExit) as info:
        run_cli(lambda c, w: called.append(c), ["prog", "--config=cfg.py", "--workdir=w", override])
    assert info.value.code == 2 and not called
    err = capsys.readouterr().err
    assert err.startswith("error: ") and any(m in err for m in message.split("|")), err


def test_parse_cli_in_process(cli_dir, monkeypatch):
    monkeypatch.chdir(cli_dir)
    args = parse_cli(["prog", "--config=cfg.py:smoke", "--workdir=/tmp/x", "--config.optimizer.warmup_steps=3"])
    assert args.workdir == pathlib.Path("/tmp/x")
    assert args.config.steps == 6 and args.config.optimizer.warmup_steps == 3
    with pytest.raises(AttributeError, match="locked"):  # the config is locked: typos in code fail too
        args.config.new_field = 1
    with pytest.raises(ConfigError, match="missing --workdir"):
        parse_cli(["prog", "--config=cfg.py"])
    with pytest.raises(ConfigError, match="missing --config"):
        parse_cli(["prog", "--workdir=/tmp/x"])
    with pytest.raises(ConfigError, match=r"missing\.py"):
        parse_cli(["prog", "--config=missing.py", "--workdir=/tmp/x"])
    with pytest.raises(ConfigError, match="positional"):
        parse_cli(["prog", "--config=cfg.py", "--workdir=/tmp/x", "extra"])


def test_config_json_roundtrip(tmp_path):
    import numpy as np

    c = ml_collections.ConfigDict({"a": 1, "b": {"c": (1, 2), "d": np.float32(0.5)}, "e": None, "f": "x"})
    path = save_config(c, tmp_path / "config.json")
    back = load_config(path)
    assert back.to_dict() == {"a": 1, "b": {"c": [1, 2], "d": 0.5}, "e": None, "f": "x"}
    assert json.loads(config_to_json(c)) == back.to_dict()
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match=r"bad\.json"):
        load_config(tmp_path / "bad.json")
