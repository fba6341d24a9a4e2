"""The sections of the job's configuration, one module per concern: each field declared once, with its type, range,
default, example, the `SFT_*` variable that sets it and what it means (`setting`, job/config/settings.py), and the
cross-field rules of the section beside it (`rules`). This package imports nothing: import a section from its module.

How to add a setting: give the section of its concern a field, `name: type = setting(default, env="name",
<range: ge=, gt=, le=, lt=, min_length=, pattern=>, examples=["..."], doc="what it means, for a user")`, in the
order its table should list it. Its variable is SFT_<ENV> (upper-cased); `doc` is the Meaning cell of its row in
docs/configuration.md (markdown; links relative to docs/). The flat `Settings` and `KNOWN_ENV_VARS`
(job/config/schema.py), `qwen3-sft config --explain` and that row derive from the field: run `make docs` to rewrite
the page's tables (tests/config/test_config_dump.py fails until the page equals them; it counts the variables
too). A default the model card gives is `card="<ModelSpec attribute>"` instead of a default. A rule across
variables goes into the section's `rules` (each problem one message naming the variables, with its raise-test in
tests/config/test_config.py). A new section is a field of `JobConfig` (job/config/schema.py) and a table title in
job/config/docs.py (`TITLES`).

Modules: base (`Section`, what several sections share), model (model, LoRA), data (data, image), train (run and
training, W&B), eval (evaluation), outputs (storage, Hub and the push gate, export, lineage, model card).
"""
