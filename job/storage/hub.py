"""Quality gate, model card and the Hub push (one commit per run, so a re-run ends in one consistent revision)."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from job import serving
from job.config.schema import JobConfig
from job.errors import UserError, classified
from job.metric_table import CARD_WHEN_MEASURED, CORE_METRICS, PRIMARY
from job.storage.sources import hub_model_id, source_kind
from job.utils.redact import redact

log = logging.getLogger(__name__)
DEFAULT_TASK_TAG = "sarcasm-detection"  # the model card's task tag, for the default SFT_TASK_NAME (sarcasm)


def parse_min_metric(spec: str | None) -> tuple[str, float] | None:
    if not spec:
        return None
    name, _, value = spec.partition(":")
    return name.strip(), float(value)


def gate_decision(metrics: dict, spec: str | None, require_improvement: bool) -> tuple[bool, str]:
    """(passed, reason). The gate metric is the threshold's metric, or macro_f1 (the metric table's PRIMARY) when
    only improvement is required."""
    threshold = parse_min_metric(spec)
    name = threshold[0] if threshold else PRIMARY
    post = (metrics.get("post") or {}).get(name)
    pre = (metrics.get("pre") or {}).get(name)
    if post is None:
        return False, f"no post-eval {name} to gate on (SFT_EVAL_POST must be true when a gate is set)"
    if threshold and post < threshold[1]:
        return False, f"post {name}={post:.4f} is below SFT_PUSH_MIN_METRIC {threshold[1]}"
    if require_improvement and pre is not None and post < pre:
        return False, f"post {name}={post:.4f} is below pre {name}={pre:.4f} (SFT_PUSH_REQUIRE_IMPROVEMENT=true)"
    return True, f"post {name}={post:.4f} passed" + (f" (>= {threshold[1]})" if threshold else "")


def build_model_card(cfg: JobConfig, run_id: str, metrics: dict, lineage: dict):
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    post = metrics.get("post") or {}
    # A Hub dataset by its repo id (what the Hub links), with the commit that was trained on.
    dataset = lineage.get("dataset_repo_id") or lineage.get("dataset_uri") or "local"
    commit = lineage.get("dataset_commit")
    results = [EvalResult(task_type="image-text-to-text", dataset_type=str(dataset),
                          dataset_name=f"{cfg.card.task_name} eval split",
                          dataset_split=cfg.data.eval_split, dataset_revision=commit, dataset_config=cfg.data.config,
                          metric_type=k, metric_value=float(post[k]))
               for k in (*CORE_METRICS, *CARD_WHEN_MEASURED) if isinstance(post.get(k), (int, float))]
    data = ModelCardData(
        base_model=hub_model_id(lineage["base_model"]), library_name="peft", pipeline_tag="image-text-to-text",
        # `datasets:` keeps the bare repo id, which the Hub links ("owner/name@sha" would link nowhere); the commit
        # goes beside it (dataset_revision) and into each eval result's dataset.revision.
        datasets=[dataset] if lineage.get("dataset_is_hub") else None, dataset_revision=commit,
        tags=card_tags(cfg),
        model_name=run_id, eval_results=results or None,
        base_model_revision=lineage.get("base_model_revision") if hub_model_id(lineage["base_model"]) else None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_card_body(cfg, run_id, metrics, lineage)}")


def base_model_line(base_model: str, revision: str | None) -> str:
    """The card's lineage line for the base model. The metadata's `base_model` takes Hub model ids only (the Hub
    refuses a push whose card names a path there: HTTP 400); a local path or an s3:// base is said here instead."""
    pinned = f" revision `{revision}`" if revision else ""
    kind = source_kind(base_model, "model")
    if kind == "hub":
        return f"- base model: `{base_model}`{pinned}"
    where = "an s3:// copy" if kind == "s3" else "a local copy"
    return (f"- base model: `{base_model}`{pinned}, {where} (SFT_MODEL_ID), not a Hub model id: the card's metadata "
            "names no `base_model`")


def card_tags(cfg: JobConfig) -> list[str]:
    """The model card's tags with the task tag from SFT_TASK_NAME: `sarcasm-detection` for the default (sarcasm),
    else `<name>-classification` (lower case, runs of other characters as one '-')."""
    name = cfg.card.task_name
    if name == "sarcasm":
        return list(cfg.card.tags)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "task"
    return [t for t in cfg.card.tags if t != DEFAULT_TASK_TAG] + [f"{slug}-classification"]


def _value(value) -> str:
    return "-" if value is None else str(value)


def _card_body(cfg: JobConfig, run_id: str, metrics: dict, lineage: dict) -> str:
    pre, post = metrics.get("pre") or {}, metrics.get("post") or {}
    keys = (*CORE_METRICS, *(k for k in CARD_WHEN_MEASURED if k in pre or k in post), "n")
    rows = "\n".join(f"| {k} | {_value(pre.get(k))} | {_value(post.get(k))} |" for k in keys)
    train_cfg = json.dumps(
        redact(cfg.model_dump(mode="json", include={"train", "lora", "image"})), indent=2, sort_keys=True
    )
    revision = lineage.get("base_model_revision")
    return f"""# {run_id}: QLoRA adapter for {lineage['base_model']}

{cfg.card.task_description}

## Evaluation (pre = base model, post = with this adapter)

| metric | pre | post |
|---|---|---|
{rows}
{_best_step(metrics)}{_per_class_table(metrics)}{_pictures(metrics)}
## Lineage

{base_model_line(lineage['base_model'], revision)}
- dataset: `{lineage.get('dataset_uri')}`{_version(lineage.get('dataset_version'))}
- data fingerprint (sha256): `{lineage.get('fingerprint')}`
{_eval_data_lines(lineage)}
- code: git `{lineage.get('git_sha') or 'not recorded'}`, image `{lineage.get('image_digest') or 'not recorded'}`

## Training config

```json
{train_cfg}
```

{how_to_use(cfg, run_id, metrics, lineage)}"""


def _version(version) -> str:
    return f" version (revision or ETags) `{version}`" if version else ""


def _best_step(metrics: dict) -> str:
    best = metrics.get("best")
    if not best:
        return ""
    value = best.get("value")
    shown = f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
    # Scored, not generated (job/train/best.py): the table's post row is generation's, so the two can differ.
    return (f"\nThis is the adapter of step {best['step']}: the best {best['metric']} ({shown}) of "
            f"{len(best['history'])} evals during training on {best['rows']} eval rows, every {best['eval_steps']} "
            f"steps (SFT_EVAL_STEPS), scored from the label probabilities (no generation); training ran to step "
            f"{best['final_step']}. Post is this adapter.\n")


def _pictures(metrics: dict) -> str:
    files = (metrics.get("report") or {}).get("files") or {}
    titles = {"confusion": "confusion matrices, pre and post", "training": "training loss and eval during training",
              "reliability": "reliability diagram (scoring mode)"}
    if not files:
        return ""
    return "\n" + "\n".join(f"![{titles.get(name, name)}]({path})" for name, path in files.items()) + "\n"


def how_to_use(cfg: JobConfig, run_id: str, metrics: dict, lineage: dict) -> str:
    """The exact prompt the adapter was trained on (Qwen3VisionSFTCollator.chat_text), a runnable example and vLLM's
    server line for the base + this adapter (job/serving.py)."""
    data = cfg.data
    label_set = metrics.get("label_set") or {}
    field = label_set.get("field") or data.label_field
    labels = ", ".join(f"`{label}`" for label in label_set.get("labels") or []) or "those of the training data"
    # The answer as job/data/rows.py target_text writes it (ensure_ascii=False: a label "grün" stays "grün").
    example = json.dumps({field: (label_set.get("labels") or ["..."])[0]}, ensure_ascii=False)
    where = cfg.hub.repo_id or "<this repo or directory>"
    revision = lineage.get("base_model_revision")
    pinned = f", revision={json.dumps(revision)}" if revision else ""
    system = (f'    {{"role": "system", "content": [{{"type": "text", "text": {json.dumps(data.system_prompt)}}}]}},\n'
              if data.system_prompt else "")
    system_line = (f"- system prompt, exactly:\n\n{_fenced(data.system_prompt)}\n" if data.system_prompt
                   else "- no system prompt (SFT_SYSTEM_PROMPT was empty)")
    # SFT_QUERY_TEXT: every row was asked the same question, so the example asks it too.
    user_line = ("- user turn: the image first, then the query; a caption, when there is one, follows the query on a "
                 "new line as\n  `CAPTION: <caption>`") if data.query_text is None else (
        "- user turn: the image first, then this query, exactly (every row was asked it, SFT_QUERY_TEXT):\n\n"
        f"{_fenced(data.query_text)}\n\n  a caption, when there is one, follows the query on a new line as "
        "`CAPTION: <caption>`")
    query_code = "<query>" if data.query_text is None else json.dumps(data.query_text, ensure_ascii=False)[1:-1]
    return f"""## How to use

The prompt format this adapter was trained on (use exactly this, or the answers drift):

{system_line}
{user_line}
- answer: one JSON object whose `{field}` is one of {labels}, e.g.
  `{example}`, then the end of turn

```python
import json

from peft import PeftModel
from PIL import Image
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

base = Qwen3VLForConditionalGeneration.from_pretrained("{lineage['base_model']}"{pinned}, dtype="auto",
                                                       device_map="auto")
model = PeftModel.from_pretrained(base, "{where}")
processor = AutoProcessor.from_pretrained("{where}")  # the image pixel bounds this adapter was trained with

messages = [
{system}    {{"role": "user", "content": [{{"type": "image"}},
                                 {{"type": "text", "text": "{query_code}\\nCAPTION: <caption>"}}]}},
]
text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
inputs = processor(text=[text], images=[Image.open("image.png").convert("RGB")], return_tensors="pt").to(model.device)
output = model.generate(**inputs, max_new_tokens={cfg.eval.max_new_tokens}, do_sample=False)
answer = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
verdict = json.loads(answer)  # {{"{field}": ...}}
```
{_vllm_section(cfg, run_id, lineage, where)}"""


def _vllm_section(cfg: JobConfig, run_id: str, lineage: dict, where: str) -> str:
    """vLLM's server line for the base + this adapter (job/serving.py, docs/export.md "Serving recipes")."""
    served = serving.vllm_adapter(lineage["base_model"], where, run_id, revision=lineage.get("base_model_revision"),
                                  lora_rank=cfg.lora.r,
                                  pixels=serving.pixel_bounds(cfg.image.min_pixels, cfg.image.max_pixels),
                                  model_len=serving.max_model_len(cfg.train.max_length, cfg.eval.max_new_tokens),
                                  max_new_tokens=cfg.eval.max_new_tokens)
    return f"""
Served by vLLM's OpenAI-compatible server, the base model with this adapter as the LoRA module `{run_id}` (a
request's `model`); the server line sets greedy decoding, `max_tokens` and the pixel bounds this adapter was trained
with, so a request needs no sampling settings:

```bash
{served}
```
"""


def _fenced(text: str) -> str:
    """`text` verbatim in a fenced block inside a list item: inline code would show a multi-line prompt on one line
    and end at its first backtick. The fence is longer than any backtick run in the text (CommonMark)."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return "\n".join(f"  {line}" if line else "" for line in (f"{fence}text", *text.splitlines(), fence))


def _per_class_table(metrics: dict) -> str:
    """Post-eval (else pre-eval) precision, recall, F1 and support per label, and the confusion matrix."""
    phase, scores = next(((k, metrics[k]) for k in ("post", "pre") if (metrics.get(k) or {}).get("per_class")),
                         (None, None))
    if scores is None:
        return ""
    rows = "\n".join(f"| {label} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
                     for label, c in scores["per_class"].items())
    cm = scores["confusion_matrix"]
    matrix = "\n".join(f"| {label} | " + " | ".join(map(str, row)) + " |" for label, row in zip(
        cm["labels"], cm["matrix"], strict=True))
    return f"""
### Per class ({phase}-eval; weighted F1 {scores['weighted_f1']:.4f})

| label | precision | recall | f1 | support |
|---|---|---|---|---|
{rows}

Confusion matrix (rows: gold label, columns: predicted; "unparsed": no JSON verdict):

| gold \\ predicted | {' | '.join(cm['columns'])} |
|---|{'---|' * len(cm['columns'])}
{matrix}
"""


def _eval_data_lines(lineage: dict) -> str:
    """Where the eval rows came from and how many of them are also training rows (preflight's count)."""
    holdout = lineage.get("eval_holdout")
    lines = [f"- eval rows: held out of the dataset's one split (SFT_EVAL_HOLDOUT={holdout}, by SFT_SEED and a hash "
             "of each row)" if holdout is not None else "- eval rows: the dataset's own eval split"]
    overlap = lineage.get("eval_overlap")
    if overlap and overlap["rows"]:
        lines.append(f"- eval rows identical to training rows: {overlap['rows']} of {overlap['of']} "
                     f"(SFT_MAX_EVAL_OVERLAP={overlap['limit']}); their scores measure memorisation")
    return "\n".join(lines)


WRITE_ROLES = ("contributor", "write", "admin")  # Hub organisation roles that can create repos and push to them


def write_access_problem(me: dict, repo_id: str) -> str | None:
    """Why the token that whoami-v2 described (`me`) cannot push to repo_id, or None when it can: a read-only token,
    a fine-grained one without `repo.write` on the repo or its namespace, or a namespace that is neither the user nor
    an organisation where the user may write. What whoami does not say (an older Hub's answer) is not refused."""
    namespace = repo_id.split("/", 1)[0]
    token = (me.get("auth") or {}).get("accessToken") or {}
    name = token.get("displayName") or "HF_TOKEN"
    if token.get("role") == "read":
        return f"HF_TOKEN ({name!r}) is a read-only token: the push needs a token with write access"
    if token.get("role") == "fineGrained":
        scoped = (token.get("fineGrained") or {}).get("scoped") or []
        if not any("repo.write" in (grant.get("permissions") or [])
                   and (grant.get("entity") or {}).get("name") in (namespace, repo_id) for grant in scoped):
            return (f"HF_TOKEN ({name!r}) is a fine-grained token without the repo.write permission on {namespace!r} "
                    f"or {repo_id!r}")
    if me.get("type", "user") != "user" or namespace == me.get("name"):
        return None
    org = next((o for o in me.get("orgs") or [] if o.get("name") == namespace), None)
    if org is None:
        return f"HF_TOKEN's user {me.get('name')!r} is not a member of {namespace!r}, so it cannot create or push there"
    if org.get("roleInOrg") not in WRITE_ROLES:
        return (f"HF_TOKEN's user {me.get('name')!r} has the role {org.get('roleInOrg')!r} in {namespace!r}, which "
                f"cannot push (one of {', '.join(WRITE_ROLES)} can)")
    return None


def check_push_access(repo_id: str, setting: str = "SFT_HUB_REPO_ID") -> str:
    """Before training (or before an export loads a model), that the push can succeed: a bad token or a repo it cannot
    write must not cost a GPU run. whoami-v2 gives the token's role and the user's organisations (write_access_problem),
    then the repo's metadata says whether it exists (it is created by the push otherwise). Returns the user name.
    `setting` is the variable that named the repo (SFT_HUB_REPO_ID, SFT_EXPORT_REPO_ID)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    context = f"{setting}={repo_id}"
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"{context} needs the Hub, but HF_HUB_OFFLINE=1")
    if not os.environ.get("HF_TOKEN"):
        raise UserError(f"{context} needs HF_TOKEN with write access")
    api = HfApi()
    try:
        me = api.whoami()
    except Exception as exc:  # classified: 401/403 -> 2, timeouts and 5xx -> 3, else a bug
        error = classified(exc, f"{context}: Hub whoami")
        if error is None:
            raise
        raise error from exc
    problem = write_access_problem(me, repo_id)
    if problem:
        raise UserError(f"{context}: {problem}; fix HF_TOKEN or name a repo it can write")
    try:
        api.repo_info(repo_id, repo_type="model")
        log.info("Hub: %s exists; the push adds a commit", repo_id)
    except RepositoryNotFoundError as exc:
        # 404: no such repo, the push creates it. 401: the Hub hides a repo this token may not see (a private repo of
        # another account), so the push could neither create nor write it.
        if exc.response is not None and exc.response.status_code != 404:
            raise UserError(f"{context}: the repo exists but HF_TOKEN may not read it (HTTP "
                            f"{exc.response.status_code}); fix HF_TOKEN or name a repo it can write") from exc
        log.info("Hub: %s does not exist yet; the push creates it", repo_id)
    except Exception as exc:  # classified as above
        error = classified(exc, f"{context}: Hub repo info")
        if error is None:
            raise
        raise error from exc
    return str(me.get("name"))


def push_adapter(adapter_dir: Path, repo_id: str, private: bool, run_id: str, *, setting: str = "SFT_HUB_REPO_ID",
                 what: str = "run") -> str:
    """create_repo(exist_ok) + one upload_folder commit of a directory (the adapter, or the merged model with
    setting="SFT_EXPORT_REPO_ID", what="export"); returns the commit URL. Errors keep their class: a status the Hub
    refused (400, 401, 403, 404, 422) is exit 2, 5xx and network failures 3, a signal (Preempted) 143, else a bug."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(adapter_dir), repo_id=repo_id, repo_type="model",
                                 commit_message=f"qwen3-sft {what} {run_id}")
    except Exception as exc:  # classified, or re-raised as it is (a Preempted keeps its 143)
        error = classified(exc, f"Hub push to {repo_id} ({setting})")
        if error is None:
            raise
        raise error from exc
    return str(getattr(info, "commit_url", info))
