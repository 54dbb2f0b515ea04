"""`prefixq worker` engine flags reach the engine config, named as vLLM names them."""


def test_worker_cli_passes_the_cascade_switch_to_the_engine():
    from jobs.cli import _engine_config, build_parser
    parse = build_parser().parse_args
    assert "cascade_attention" not in _engine_config(parse(["worker"]))
    assert _engine_config(parse(["worker", "--cascade-attention", "off"]))["cascade_attention"] is False
    assert _engine_config(parse(["worker", "--cascade-attention", "on"]))["cascade_attention"] is True


def test_worker_cli_passes_prompt_lookup_bounds():
    from jobs.cli import _engine_config, build_parser
    cfg = _engine_config(build_parser().parse_args(
        ["worker", "--speculative-method", "ngram", "--prompt-lookup-min", "1", "--prompt-lookup-max", "6"]))
    assert cfg["prompt_lookup_min"] == 1 and cfg["prompt_lookup_max"] == 6


def test_worker_cli_drafting_ahead_is_opt_in():
    from engine.config import EngineConfig
    from jobs.cli import _engine_config, build_parser
    parse = build_parser().parse_args
    assert "speculative_draft_ahead" not in _engine_config(parse(["worker", "--speculative-method", "ngram"]))
    cfg = _engine_config(parse(["worker", "--speculative-method", "suffix", "--speculative-draft-ahead"]))
    assert cfg["speculative_draft_ahead"] is True
    assert EngineConfig(model="m", speculative_method="ngram").speculative_draft_ahead is False


def test_worker_num_scheduler_steps_flag():
    from jobs.cli import _engine_config, build_parser
    parse = build_parser().parse_args
    assert "num_scheduler_steps" not in _engine_config(parse(["worker"]))
    assert _engine_config(parse(["worker", "--num-scheduler-steps", "4"]))["num_scheduler_steps"] == 4
