"""Job configuration: each setting declared once in its section (`sections`, one module per concern), the `SFT_*`
variables derived from them and validated all at once (`settings`), the typed `JobConfig` built from them over a
model card (`schema`), and the settings tables of docs/configuration.md and `qwen3-sft config --explain` (`docs`).

`build_cfg(ModelCards().qwen3_vl_8b_instruct)` (job.config.schema) returns a frozen `JobConfig`, read as
`cfg.train.max_length`; `job.build_cfg` is the public API.
"""
