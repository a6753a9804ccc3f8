"""Stage `prepare`: corpus → document splits → tokenizer (train only) → uint16 memmaps."""

from pathlib import Path

from clso.data.corpus import load_corpus
from clso.data.tokens import prepare_dataset
from clso.energy import EnergyMeter
from clso.io import write_json_atomic
from clso.params import load_params
from stages.common import PARAMS_OPTION, run_alone, stage
from stages.paths import PREPARED, detail


@stage("prepare", sections=("base", "prepare"))
def prepare(params: Path = PARAMS_OPTION) -> None:
    """Split the corpus by document, train the tokenizer on the train split only, and write
    data/prepared/{train,val,test}.bin, tokenizer.json, meta.json and metrics/detail/prepare.json."""
    p = load_params(params)
    s = p.prepare
    with EnergyMeter(**p.base.meter_options("cpu")) as meter:
        corpus = load_corpus(s.corpus, stage_directions=s.stage_directions, decode_errors=s.decode_errors)
        meta = prepare_dataset(
            corpus, PREPARED, corpus_name=s.corpus, tokenizer_kind=s.tokenizer, vocab_size=s.vocab_size,
            gpt2_dir=s.gpt2_tokenizer_dir, val_fraction=s.val_fraction, test_fraction=s.test_fraction, seed=p.base.seed,
        )
    splits = meta["tokens"].keys()
    write_json_atomic(detail("prepare"), {
        "vocab_size": meta["vocab_size"],
        "documents": {s: len(meta["documents"][s]) for s in splits},
        "tokens": meta["tokens"],
        "chars_per_token": {s: round(meta["chars"][s] / max(1, meta["tokens"][s]), 4) for s in splits},
        "decode": corpus.decode.as_metrics(),
        **meter.reading.as_metrics(),
    })
    for names, what in ((corpus.decode.replaced, "had bytes replaced by U+FFFD"),
                        (corpus.decode.skipped, "were left out")):
        if names:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            print(f"prepare: {len(names)} file(s) not UTF-8 {what} (prepare.decode_errors: "
                  f"{corpus.decode.errors}): {shown}")
    print(f"prepare: {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} val / "
          f"{meta['tokens']['test']:,} test tokens, vocab {meta['vocab_size']} → {PREPARED}")


if __name__ == "__main__":
    run_alone("prepare")
