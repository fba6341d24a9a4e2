"""Job configuration: `SFT_*` environment variables (`settings`) and the typed config built from them (`schema`).

`build_cfg(ModelCards().qwen3_vl_8b_instruct)` (job.config.schema) returns a frozen `JobConfig`, read as
`cfg.train.max_length`.
"""
