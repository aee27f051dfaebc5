"""Newcomer notes (issue 9, class 10): the admin client's flags on either side of the subcommand, one
token source at a time, one cache variable, and the package metadata setuptools will keep accepting."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hotlora.server.cli import adapters_command, build_parser


def test_admin_client_flags_before_or_after_the_subcommand():
    after = build_parser().parse_args(["adapters", "list", "--url", "http://h:1", "--token", "t", "--timeout", "5"])
    before = build_parser().parse_args(["adapters", "--url", "http://h:1", "--token", "t", "--timeout", "5", "list"])
    for args in (after, before):
        assert (args.url, args.token, args.timeout, args.token_file) == ("http://h:1", "t", 5.0, None)
    plain = build_parser().parse_args(["adapters", "delete", "x"])
    assert plain.url.startswith("http://") and plain.token is None and plain.timeout == 300.0


def test_token_and_token_file_together_are_refused(tmp_path, capsys):
    token_file = tmp_path / "token"
    token_file.write_text("secret\n")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["adapters", "list", "--token", "a", "--token-file", str(token_file)])
    args = build_parser().parse_args(["adapters", "--token", "a", "list", "--token-file", str(token_file)])
    assert adapters_command(args) == 2
    assert "not both" in capsys.readouterr().err


def test_one_cache_variable_and_the_new_serve_flags(monkeypatch):
    monkeypatch.delenv("HOTLORA_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOTLORA_CACHE", "/tmp/old-name")
    assert build_parser().parse_args(["serve"]).cache_dir == Path("/tmp/old-name")
    monkeypatch.setenv("HOTLORA_CACHE_DIR", "/tmp/new-name")
    args = build_parser().parse_args(["serve", "--max-body-bytes", "1MiB", "--shutdown-grace-s", "2.5"])
    assert args.cache_dir == Path("/tmp/new-name")
    assert (args.max_body_bytes, args.shutdown_grace_s) == (1 << 20, 2.5)


def test_license_is_an_spdx_string():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()  # no tomllib on Python 3.10
    assert re.search(r'^license = "Apache-2\.0"$', text, re.MULTILINE)
    assert re.search(r'"setuptools>=77(,<\d+)?"', text)  # the first setuptools that reads SPDX license strings


def test_batch_limits_default_by_device():
    """max_num_seqs / max_num_batched_tokens left at None (the CLI's default, or 'auto') take the device's
    defaults once the runner knows the device; values given are kept."""
    from hotlora.server.engine.config import DEVICE_DEFAULTS, EngineConfig

    args = build_parser().parse_args(["serve", "--max-num-batched-tokens", "auto"])
    assert (args.max_num_seqs, args.max_num_batched_tokens) == (None, None)
    for device in ("cuda", "cpu"):
        cfg = EngineConfig()
        cfg.for_device(device)
        assert (cfg.max_num_seqs, cfg.max_num_batched_tokens) == DEVICE_DEFAULTS[device]
    assert DEVICE_DEFAULTS["cuda"] == (256, 4096) and DEVICE_DEFAULTS["cpu"] == (64, 2048)
    kept = EngineConfig(max_num_seqs=7, max_num_batched_tokens=99)
    kept.for_device("cuda")
    assert (kept.max_num_seqs, kept.max_num_batched_tokens) == (7, 99)


@pytest.mark.parametrize("bad", ["0", "-0.001", "nan", "inf", "1e-9", "fast"])
def test_gil_switch_interval_refuses_what_setswitchinterval_would_misread(bad, monkeypatch):
    """sys.setswitchinterval takes nan as ~292,000 years and inf or 1e-9 as 0: the parser refuses them (flag and
    environment variable alike) before the server starts."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--gil-switch-interval", bad])
    monkeypatch.setenv("HOTLORA_GIL_SWITCH_INTERVAL", bad)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve"])


def test_gil_switch_interval_accepts_seconds(monkeypatch):
    assert build_parser().parse_args(["serve", "--gil-switch-interval", "0.001"]).gil_switch_interval == 0.001
    monkeypatch.setenv("HOTLORA_GIL_SWITCH_INTERVAL", "1e-6")
    assert build_parser().parse_args(["serve"]).gil_switch_interval == 1e-6


@pytest.mark.parametrize("name", ["max_loras", "max_lora_rank", "max_adapter_wait_steps", "block_size"])
def test_only_the_batch_limits_may_be_left_to_the_device(name):
    """None means 'by device' for max_num_seqs / max_num_batched_tokens only: the other limits refuse it at once."""
    from hotlora.server.engine.config import EngineConfig

    with pytest.raises(ValueError, match=name):
        EngineConfig(**{name: None})
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="lora_pool_rows"):  # an adapter of the largest rank must fit the pool
        EngineConfig(max_lora_rank=16, lora_pool_rows=8)


def test_ports_outside_0_to_65535_are_refused_when_parsed(capsys):
    for bad in ("70000", "-1", "http"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--port", bad])
        assert "not a port" in capsys.readouterr().err
    assert build_parser().parse_args(["serve", "--port", "65535"]).port == 65535


def test_an_unreadable_token_file_is_a_message_not_a_traceback(tmp_path, capsys):
    for path in (tmp_path / "missing", tmp_path):  # absent; a folder
        args = build_parser().parse_args(["adapters", "list", "--token-file", str(path)])
        assert adapters_command(args) == 2
        assert "cannot read the token file" in capsys.readouterr().err


def test_the_admin_client_checks_names_before_they_reach_a_url(tmp_path, capsys):
    """'x#y' was cut at '#' and uploaded as x; 'x/load' pinned x. The name rule is the store's."""
    folder = tmp_path / "ad"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_text("{}")
    for op, extra in (("upload", [str(folder)]), ("delete", []), ("load", [])):
        for name in ("foo#bar", "foo?x=1", "my-ad/load", ".."):
            args = build_parser().parse_args(["adapters", "--url", "http://127.0.0.1:9", op, name, *extra])
            assert adapters_command(args) == 1
            err = capsys.readouterr().err
            assert "invalid adapter name" in err and "cannot reach" not in err, err


def test_merge_reads_the_adapter_store_from_the_environment(monkeypatch):
    monkeypatch.setenv("HOTLORA_ADAPTER_DIR", "/adapters")
    args = build_parser().parse_args(["merge", "--adapter", "a", "--out", "o"])
    assert args.adapter_dir == Path("/adapters")


def test_ray_app_builder_switches_take_their_boolean():
    from hotlora.server.ray_serve import builder_argv

    argv = builder_argv({"model": "default", "enable_prefix_caching": "false", "launch_pacing": "true",
                         "max_loras": "4"})
    assert argv == ["serve-ray", "--model", "default", "--no-enable-prefix-caching", "--launch-pacing",
                    "--max-loras", "4"]
    args = build_parser().parse_args(argv)
    assert (args.enable_prefix_caching, args.launch_pacing, args.max_loras) == (False, True, 4)


def test_engine_config_checks_the_device_and_expands_home(monkeypatch):
    from hotlora.server.engine.config import EngineConfig

    with pytest.raises(ValueError, match="device"):
        EngineConfig(device="bogus")
    assert EngineConfig(device="cuda:1").device == "cuda:1"
    monkeypatch.setenv("HOME", "/home/someone")
    cfg = EngineConfig(cache_dir="~/cache", adapter_dir="~/adapters")
    assert (cfg.cache_dir, cfg.adapter_dir) == (Path("/home/someone/cache"), Path("/home/someone/adapters"))
