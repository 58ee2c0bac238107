"""A stage that exists only in the tests (tests/test_stages.py registers it as `toy`): the proof that adding a stage
is one registry entry and one module. It follows the stage skeleton of ft/stages/common.py: start (run folder, seed,
"run folder:" line), data checked before anything else, the measured section, the final save, metrics.json last.
What it "trains" is a count: the tokens of each role in data.train."""

from ft import data, models, runs
from ft.stages import common


def run(recipe, *, resume: bool = False, log=print) -> dict:
    out, _ = common.start(recipe, resume=resume, log=log)
    dialogs, report = data.load_dialogs(recipe.data.train, skip_invalid=recipe.data.skip_invalid)
    log(report.summary("dialogs"))
    tokenizer = models.load_tokenizer(recipe.model.name)
    with common.measured() as measured:
        tokens = {}
        for dialog in dialogs:
            for message in dialog["messages"]:
                tokens[message["role"]] = tokens.get(message["role"], 0) + len(tokenizer(message["content"]).input_ids)
    runs.save_final(out, lambda tmp: runs.write_json(tmp / "tokens.json", tokens))
    metrics = {"stage": "toy", "dialogs": len(dialogs), "tokens": tokens, **measured}
    runs.write_json(out / runs.METRICS_FILE, metrics)
    return metrics
