"""Configuration precedence (flag > env > file > default), secret masking, `prefixq config`,
and structured logs carrying job ids."""
import json
import logging
import os
import subprocess
import sys

import pytest

from jobs import config
from worker import logging_setup

BIN = os.path.dirname(sys.executable)


def test_precedence_flag_env_file_default(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('redis_url = "redis://file:6379/0"\nqueue = "from-file"\nmodel = "file-model"\nsplit_rows = 7\n')
    env = {"PREFIXQ_QUEUE": "from-env", "PREFIXQ_MODEL": "env-model"}
    s = config.resolve({"model": "flag-model"}, str(f), environ=env)
    assert (s["model"].value, s["model"].source) == ("flag-model", "flag")
    assert (s["queue"].value, s["queue"].source) == ("from-env", "env")
    assert (s["redis_url"].value, s["redis_url"].source) == ("redis://file:6379/0", f"file:{f}")
    assert (s["split_rows"].value, s["split_rows"].source) == ("7", f"file:{f}")
    assert (s["engine"].value, s["engine"].source) == ("auto", "default")
    # PREFIXQ_CONFIG names the file when --config does not
    assert config.resolve({}, None, environ={"PREFIXQ_CONFIG": str(f)})["queue"].value == "from-file"


def test_apply_to_environ_fills_only_unset(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('queue = "from-file"\nstore = "s3://bkt/p"\n')
    env = {"PREFIXQ_QUEUE": "from-env"}
    config.apply_to_environ(str(f), environ=env)
    assert env == {"PREFIXQ_QUEUE": "from-env", "PREFIXQ_STORE": "s3://bkt/p"}


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.resolve({}, str(tmp_path / "missing.toml"), environ={})
    (tmp_path / "u.toml").write_text('redis = "x"\n')
    with pytest.raises(config.ConfigError, match="unknown keys redis"):
        config.resolve({}, str(tmp_path / "u.toml"), environ={})
    (tmp_path / "b.toml").write_text('queue = \n')
    with pytest.raises(config.ConfigError, match="b.toml"):
        config.resolve({}, str(tmp_path / "b.toml"), environ={})


def test_mask():
    assert config.mask("redis://:hunter2@redis:6379/0", "url") == "redis://:****@redis:6379/0"
    assert config.mask("rediss://app:hunter2@h/1", "url") == "rediss://app:****@h/1"
    assert config.mask("redis://h:6379/0", "url") == "redis://h:6379/0"
    assert config.mask("wJalrXUtnFEMI", "value") == "****"
    assert config.mask("", "value") == ""


def test_config_command_shows_sources_and_masks_secrets(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('aws_secret_access_key = "wJalrXUtnFEMIsecret"\nqueue = "from-file"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFIXQ_", "AWS_"))}
    env.update(PREFIXQ_REDIS_URL="redis://:hunter2@redis:6379/0", HOME=str(tmp_path))
    p = subprocess.run([os.path.join(BIN, "prefixq"), "config", "--config", str(f), "--model", "m1"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    lines = {ln.split()[0]: ln.split() for ln in p.stdout.splitlines()[2:]}
    assert lines["redis_url"][1:] == ["redis://:****@redis:6379/0", "env"]
    assert lines["aws_secret_access_key"][1:] == ["****", f"file:{f}"]
    assert lines["queue"][1:] == ["from-file", f"file:{f}"]
    assert lines["model"][1:] == ["m1", "flag"]
    assert "hunter2" not in p.stdout and "wJalr" not in p.stdout
    # an explicit file that is missing is an error
    p = subprocess.run([os.path.join(BIN, "prefixq"), "--config", str(tmp_path / "nope.toml"), "config"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not found" in p.stderr


def test_json_logs_carry_job_ids(capsys):
    logging_setup.setup("json", "INFO")
    try:
        log = logging.getLogger("prefixq.test")
        with logging_setup.job_context("j250101-abc"):
            log.info("row %d done", 3, extra={"rows": 3})
        log.warning("outside")
        err = capsys.readouterr().err.splitlines()
        a, b = json.loads(err[0]), json.loads(err[1])
        assert a["job_id"] == "j250101-abc" and a["msg"] == "row 3 done" and a["rows"] == 3 and a["level"] == "INFO"
        assert "job_id" not in b and b["msg"] == "outside"
        logging_setup.setup("text", "INFO")
        with logging_setup.job_context("j250101-abc"):
            log.info("hello")
        assert "[job=j250101-abc]: hello" in capsys.readouterr().err
        with pytest.raises(ValueError):
            logging_setup.setup("xml")
    finally:
        for h in list(logging.getLogger().handlers):
            logging.getLogger().removeHandler(h)
