import dataclasses

import pytest

from clso import ClsoError
from clso.data.corpus import (
    DECODE_ERRORS,
    Document,
    cut_into_pieces,
    load_corpus,
    load_wikitext,
    play_to_text,
    split_documents,
    split_wikitext_articles,
)
from clso.params import PrepareParams

PLAY = """# The Tragedy of Tests

## ACT I

## SCENE I. A lab.

_Enter FIRST CODER and a REVIEWER,
with notes_

**FIRST CODER**  
Shall I compare thee to a passing test?  
Thou art more \\[lovely] and more temperate\\--

**REVIEWER**  
_\\[Aside]_  
A little more than kin.

_Exit FIRST CODER_

Who comes here?

**GHOST**  
_Beneath_

### SCENE II. Elsewhere.

**REVIEWER**  
[Within]_  
Who's there?
"""


def test_play_becomes_tiny_shakespeare_layout():
    text = play_to_text(PLAY)
    assert text == (
        "FIRST CODER:\nShall I compare thee to a passing test?\nThou art more [lovely] and more temperate--\n\n"
        "REVIEWER:\nA little more than kin.\nWho comes here?\n\n"
        "REVIEWER:\nWho's there?\n"
    )


def test_stage_directions_can_be_kept():
    text = play_to_text(PLAY, stage_directions=True)
    assert "[Enter FIRST CODER and a REVIEWER, with notes]" in text
    assert "REVIEWER:\n[Aside]\nA little more than kin.\n[Exit FIRST CODER]\nWho comes here?" in text
    assert "GHOST:\n[Beneath]" in text
    assert "[Within]\nWho's there?" in text


def test_shipped_shakespeare_has_38_plays_without_markdown():
    corpus = load_corpus("shakespeare")
    assert len(corpus.documents) == 38 and corpus.official_splits is None
    assert {"hamlet", "macbeth", "the-tempest"} <= {d.name for d in corpus.documents}
    text = "".join(d.text for d in corpus.documents)
    for marker in ("**", "##", "_", "\\["):
        assert marker not in text
    assert "HAMLET:\n" in text and len(text) > 4_000_000


def test_splits_are_disjoint_whole_documents_fixed_by_seed():
    docs = [Document(f"d{i:02d}", f"text {i}") for i in range(38)]
    splits = split_documents(docs, 0.1, 0.1, seed=7)
    names = {k: {d.name for d in v} for k, v in splits.items()}
    assert [len(names[k]) for k in ("train", "val", "test")] == [30, 4, 4]
    assert not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    assert set().union(*names.values()) == {d.name for d in docs}
    assert split_documents(list(reversed(docs)), 0.1, 0.1, seed=7) == splits  # input order is irrelevant
    assert split_documents(docs, 0.1, 0.1, seed=8) != splits


def test_too_few_documents_is_a_clear_error():
    with pytest.raises(ClsoError, match="too few for train, val and test"):
        split_documents([Document("a", "x"), Document("b", "y")], 0.1, 0.1, seed=0)


def test_one_file_is_cut_into_contiguous_pieces_losing_nothing():
    text = "".join(f"paragraph {i}\nline two\n\n" for i in range(1000))
    pieces = cut_into_pieces("book.txt", text)
    assert 90 <= len(pieces) <= 100
    assert "".join(p.text for p in pieces) == text
    assert all(p.text.endswith("\n\n") for p in pieces)  # cut at blank lines only
    assert pieces[0].name == "book.txt#00"


def test_text_corpus_from_folder_and_file(text_corpus, tmp_path):
    folder = load_corpus(f"text:{text_corpus}")
    assert [d.name for d in folder.documents] == [f"doc{i:02d}.txt" for i in range(12)]
    single = load_corpus(f"text:{text_corpus / 'doc00.txt'}")
    assert "".join(d.text for d in single.documents) == (text_corpus / "doc00.txt").read_text()


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "no such file or folder"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no .txt files"),
    (lambda p: (p / "bad.txt").write_bytes(b"ok\xff\xfe") and p / "bad.txt", "not UTF-8"),
])
def test_text_corpus_errors(tmp_path, make, message):
    with pytest.raises(ClsoError, match=message):
        load_corpus(f"text:{make(tmp_path)}")


LATIN1 = "Caf\u00e9 au lait, na\u00efve r\u00e9sum\u00e9.\n".encode("latin-1")  # \xe9 alone is not UTF-8


def test_latin1_file_stops_a_strict_load_naming_the_file_and_the_param(text_corpus):
    (text_corpus / "news" / "latin1.txt").parent.mkdir()
    (text_corpus / "news" / "latin1.txt").write_bytes(LATIN1)
    with pytest.raises(ClsoError) as err:
        load_corpus(f"text:{text_corpus}")
    message = str(err.value)
    assert "\n" not in message and "news/latin1.txt: not UTF-8 text (byte 3)" in message
    assert "iconv -t utf-8" in message and "prepare.decode_errors: replace or skip" in message


def test_decode_errors_replace_keeps_the_file_with_replacement_characters(text_corpus):
    (text_corpus / "latin1.txt").write_bytes(LATIN1)
    corpus = load_corpus(f"text:{text_corpus}", decode_errors="replace")
    by_name = {d.name: d.text for d in corpus.documents}
    assert len(by_name) == 13 and by_name["latin1.txt"] == "Caf\ufffd au lait, na\ufffdve r\ufffdsum\ufffd.\n"
    assert by_name["doc00.txt"].startswith("Document 0: é ünïcode ✓")  # valid UTF-8 is untouched
    assert corpus.decode.as_metrics() == {"errors": "replace", "files_with_replacements": 1, "files_skipped": 0}
    assert corpus.decode.replaced == ("latin1.txt",)


def test_decode_errors_skip_leaves_the_file_out(text_corpus):
    (text_corpus / "latin1.txt").write_bytes(LATIN1)
    corpus = load_corpus(f"text:{text_corpus}", decode_errors="skip")
    assert [d.name for d in corpus.documents] == [f"doc{i:02d}.txt" for i in range(12)]
    assert corpus.decode.as_metrics() == {"errors": "skip", "files_with_replacements": 0, "files_skipped": 1}
    assert corpus.decode.skipped == ("latin1.txt",)


def test_decode_errors_change_nothing_when_every_file_is_utf8(text_corpus):
    plain = load_corpus(f"text:{text_corpus}")
    for mode in DECODE_ERRORS:
        corpus = load_corpus(f"text:{text_corpus}", decode_errors=mode)
        assert corpus.documents == plain.documents
        assert corpus.decode.as_metrics() == {"errors": mode, "files_with_replacements": 0, "files_skipped": 0}


def test_decode_errors_replace_on_a_single_file(tmp_path):
    (tmp_path / "book.txt").write_bytes(LATIN1 * 50)
    corpus = load_corpus(f"text:{tmp_path / 'book.txt'}", decode_errors="replace")
    assert "\ufffd" in corpus.documents[0].text and corpus.decode.files_with_replacements == 1


@pytest.mark.parametrize("target, message", [
    (lambda p: p / "book.txt", "book.txt: not UTF-8 text, and prepare.decode_errors: skip leaves no corpus"),
    (lambda p: p, "none of its 2 .txt files is UTF-8 text"),
])
def test_skipping_every_file_is_a_clear_error(tmp_path, target, message):
    (tmp_path / "book.txt").write_bytes(LATIN1)
    (tmp_path / "other.txt").write_bytes(LATIN1)
    with pytest.raises(ClsoError, match=message) as err:
        load_corpus(f"text:{target(tmp_path)}", decode_errors="skip")
    assert "\n" not in str(err.value) and "prepare.decode_errors: replace" in str(err.value)


def test_decode_errors_values_match_the_param_choices():
    field = next(f for f in dataclasses.fields(PrepareParams) if f.name == "decode_errors")
    assert tuple(field.metadata["choices"]) == DECODE_ERRORS and field.default == "strict"
    with pytest.raises(ValueError, match="decode_errors"):
        load_corpus("shakespeare", decode_errors="ignore")


def test_wikitext_lines_split_into_articles():
    lines = ["", " = Alpha = \n", " Alpha text . \n", " = = Section = = \n", " more . \n",
             " = Beta = \n", " Beta text . \n"]
    docs = split_wikitext_articles(lines)
    assert [d.name for d in docs] == ["Alpha", "Beta"]
    assert " = = Section = = \n" in docs[0].text and "Beta text" in docs[1].text


def test_wikitext_offline_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ClsoError) as err:
        load_wikitext("wikitext-2")
    msg = str(err.value)
    assert "\n" not in msg and "Couldn't reach" in msg and "text:PATH" in msg


def test_wikitext_uses_official_splits(monkeypatch):
    import datasets

    fake = {"train": {"text": [" = A = \n", "a\n", " = B = \n", "b\n"]},
            "validation": {"text": [" = C = \n", "c\n"]}, "test": {"text": [" = D = \n", "d\n"]}}
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake)
    corpus = load_wikitext("wikitext-103")
    assert {k: [d.name for d in v] for k, v in corpus.official_splits.items()} == {
        "train": ["A", "B"], "val": ["C"], "test": ["D"]}
