"""Scoring rules, prompts, TSV reading, data-parallel merge order and resume (no model needed)."""

from __future__ import annotations

import base64
import csv
import io
import json
import subprocess
import sys
import textwrap

import pytest
from PIL import Image

from mmzoo.cli import main
from mmzoo.errors import MmzooError
from mmzoo.eval import scoring
from mmzoo.eval.datasets import Question, build_prompt, decode_image, get_dataset, read_tsv, score_question
from mmzoo.eval.run import evaluate, merge, read_cache, shard

OPTIONS = {"A": "a cat", "B": "black cat", "C": "dog", "D": "the sun"}


# ---------------------------------------------------------------- multiple choice


@pytest.mark.parametrize(
    "prediction, expected",
    [
        ("B", "B"),
        (" (B) ", "B"),
        ("B.", "B"),
        ("C)", "C"),
        ("The answer is B", "B"),
        ("the answer is (C).", "C"),
        ("Answer: D", "D"),
        ("Final answer: (A)", "A"),
        ("B. black cat", "B"),
        ("I think (C) fits best", "C"),
        ("Looking at the diagram, D is shown", "D"),
        ("dog", "C"),
        ("It is a dog.", "C"),
        ("Black Cat!", "B"),  # case and punctuation
        ("the picture shows a black cat", "B"),  # the longer option wins over "a cat"
        ("The Sun", "D"),
    ],
)
def test_choice_extraction_rules(prediction, expected):
    assert scoring.extract_choice(prediction, OPTIONS) == expected


@pytest.mark.parametrize(
    "prediction",
    [
        "",
        "E",  # not an option
        "I cannot tell",  # "I" the word, not a letter
        "A bird sitting on a branch",  # the article "A"
        "either (B) or (C)",  # two letters
        "a dog or a black cat",  # two option texts
        "no idea",
    ],
)
def test_choice_extraction_gives_up(prediction):
    assert scoring.extract_choice(prediction, OPTIONS) is None


def test_unparseable_choice_counts_wrong_and_is_flagged():
    q = Question("1", "What animal?", "C", options=dict(OPTIONS))
    ai2d = get_dataset("ai2d_test")
    assert score_question(q, "no idea", ai2d).unparsed is True
    assert score_question(q, "no idea", ai2d).score == 0.0
    assert score_question(q, "(C)", ai2d) == score_question(q, "dog", ai2d)
    assert score_question(q, "(C)", ai2d).score == 1.0
    assert score_question(q, "B", ai2d).score == 0.0


# ---------------------------------------------------------------- ChartQA


@pytest.mark.parametrize(
    "prediction, target, correct",
    [
        ("105", "100", True),  # exactly 5% above
        ("95", "100", True),  # exactly 5% below
        ("105.01", "100", False),  # just over
        ("94.99", "100", False),
        ("0.21", "0.2", True),  # 5% of a small value
        ("0.2101", "0.2", False),
        ("45%", "45", True),  # percent sign
        ("45", "45%", True),
        ("1,234", "1234", True),  # thousands separator
        ("1,234,567.5", "1234567.5", True),
        ("$12", "12", True),  # currency
        ("12 kg", "12", True),  # unit
        ("12 million", "12.3", True),
        ("0", "0", True),
        ("0.01", "0", False),  # no tolerance around 0
        ("-10", "10", False),
        ("Yes", "yes", True),  # case
        ("yes.", "Yes", True),  # final punctuation
        ("The answer is Brazil.", "Brazil", True),
        ("Brazil", "Brazilia", False),
        ("12 and 13", "12", False),
    ],
)
def test_chartqa_relaxed_accuracy(prediction, target, correct):
    assert scoring.relaxed_correct(prediction, target) is correct


def test_chartqa_answer_list():
    assert scoring.relaxed_accuracy("7", ["5", "7.2"]) == 1.0
    assert scoring.relaxed_accuracy("8", ["5", "7.2"]) == 0.0


def test_parse_number():
    assert scoring.parse_number("1,234.5") == 1234.5
    assert scoring.parse_number("-3.5%") == -3.5
    assert scoring.parse_number("1e3") == 1000.0
    assert scoring.parse_number("abc") is None
    assert scoring.parse_number("12,34") is None  # not a thousands grouping


# ---------------------------------------------------------------- DocVQA


def test_anls_threshold_and_lists():
    assert scoring.anls("abcd", ["abcd"]) == 1.0
    assert scoring.anls(" ABCD ", ["abcd"]) == 1.0  # case and surrounding space
    assert scoring.anls("abcx", ["abcd"]) == pytest.approx(0.75)
    assert scoring.anls("abxy", ["abcd"]) == 0.0  # distance exactly 0.5: at the threshold -> 0
    assert scoring.anls("abcdx", ["abcd"]) == pytest.approx(0.8)
    assert scoring.anls("abcxyz", ["abcdef", "abcxyq"]) == pytest.approx(5 / 6)  # best of the list
    assert scoring.anls("", ["abc"]) == 0.0
    assert scoring.anls("new  york", ["New York"]) == 1.0  # whitespace collapsed


def test_levenshtein():
    assert scoring.levenshtein("kitten", "sitting") == 3
    assert scoring.levenshtein("", "abc") == 3


def test_answer_list_parsing():
    assert scoring.answer_list("['1/8', 'one eighth']") == ["1/8", "one eighth"]
    assert scoring.answer_list('["x"]') == ["x"]
    assert scoring.answer_list("[not a list") == ["[not a list"]
    assert scoring.answer_list("plain") == ["plain"]


# ---------------------------------------------------------------- MMMU open


@pytest.mark.parametrize(
    "prediction, targets, correct",
    [
        ("The answer is 3.14", ["3.14"], True),
        ("So the value is 3.141", ["3.14"], True),  # rounded to 2 decimals
        ("Therefore, the total is 1,200 dollars.", ["1200"], True),
        ("It is 12", ["13"], False),
        ("The final answer is Mitochondria.", ["mitochondria"], True),
        ("The organelle is the nucleus", ["mitochondria"], False),
        ("x = 5", ["5"], True),
        ("The answer is 5", ["['4', '5']"][0:1] and ["4", "5"], True),  # any accepted answer
    ],
)
def test_mmmu_open_matching(prediction, targets, correct):
    assert scoring.open_correct(prediction, targets) is correct


def test_mmmu_open_question_scored_as_open():
    mmmu = get_dataset("mmmu_dev_val")
    q = Question("7", "<image 1> How many?", "['4', 'four']")
    assert score_question(q, "There are four", mmmu).score == 1.0
    assert score_question(q, "The count is 5", mmmu).score == 0.0


# ---------------------------------------------------------------- prompts


def test_prompts_per_dataset():
    q = Question("1", "What eats the frog?", "B", options={"A": "snake", "B": "hawk"}, hint="A food web")
    ai2d = build_prompt(q, get_dataset("ai2d_test"))
    assert ai2d == (
        "Hint: A food web\nQuestion: What eats the frog?\nOptions:\nA. snake\nB. hawk\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert build_prompt(q, get_dataset("mmmu_dev_val")) == ai2d
    open_q = Question("2", "What is the total?", "42")
    for name in ("chartqa_test", "docvqa_val", "mmmu_dev_val"):
        assert build_prompt(open_q, get_dataset(name)) == (
            "What is the total?\nAnswer the question using a single word or phrase."
        )


# ---------------------------------------------------------------- TSV reading and errors


def b64_image(color=(200, 30, 30), size=(8, 6)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path, rows, columns):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path


def ai2d_rows(n=5):
    letters = "ABCD"
    return [
        {
            "index": str(10 + i),
            "image": b64_image() if i == 0 else "10",  # later rows refer to row 0's image by index
            "question": f"Question {i}?",
            "A": "red",
            "B": "green",
            "C": "blue",
            "D": "" if i % 2 else "black",
            "answer": letters[i % 3],
            "category": "colors" if i < 3 else "shapes",
        }
        for i in range(n)
    ]


COLUMNS = ["index", "image", "question", "A", "B", "C", "D", "answer", "category"]


def test_read_tsv(tmp_path):
    questions = read_tsv(write_tsv(tmp_path / "a.tsv", ai2d_rows(), COLUMNS), get_dataset("ai2d_test"))
    assert [q.index for q in questions] == ["10", "11", "12", "13", "14"]
    assert questions[1].options == {"A": "red", "B": "green", "C": "blue"}  # empty option dropped
    assert questions[3].images == questions[0].images  # the index reference resolved
    assert decode_image(questions[3].images[0], questions[3].where).size == (8, 6)


def test_mmmu_image_lists(tmp_path):
    rows = [
        {"index": "1", "image": repr([b64_image(), b64_image((0, 0, 0))]), "question": "q", "answer": "4"}
    ]
    questions = read_tsv(write_tsv(tmp_path / "m.tsv", rows, list(rows[0])), get_dataset("mmmu_dev_val"))
    assert len(questions[0].images) == 2


def test_tsv_errors_name_row_and_column(tmp_path):
    ai2d = get_dataset("ai2d_test")
    no_answer = write_tsv(
        tmp_path / "n.tsv", [{"index": "1", "image": "x", "question": "q"}], ["index", "image", "question"]
    )
    with pytest.raises(MmzooError, match=r"n.tsv: missing column 'answer'"):
        read_tsv(no_answer, ai2d)
    rows = ai2d_rows(2)
    rows[1]["image"] = "bm90IGFuIGltYWdl"  # base64 of "not an image"
    questions = read_tsv(write_tsv(tmp_path / "b.tsv", rows, COLUMNS), ai2d)
    with pytest.raises(MmzooError, match=r"b.tsv row 3, column 'image': not a decodable base64 image"):
        decode_image(questions[1].images[0], questions[1].where)
    rows[1]["image"] = "99"
    with pytest.raises(MmzooError, match=r"row 3, column 'image': refers to index 99"):
        read_tsv(write_tsv(tmp_path / "r.tsv", rows, COLUMNS), ai2d)
    with pytest.raises(MmzooError, match="unknown dataset 'ai2d'.*ai2d_test"):
        get_dataset("ai2d")


def test_unknown_dataset_is_one_line_cli_error(tmp_path, capsys):
    assert main(["eval", "score", "--dataset", "mmbench", "--predictions", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmzoo: error: unknown dataset 'mmbench'") and err.count("\n") == 1


# ---------------------------------------------------------------- DP merge order and resume


def fake_generator(answers, calls):
    def generate(batch):
        calls.extend(q.index for q in batch)
        return [answers[q.index] for q in batch]

    return generate


def test_shard_and_merge_keep_index_order():
    questions = [Question(str(i), "q", "A") for i in (5, 3, 9, 1, 7)]
    parts = [{q.index: f"p{q.index}" for q in shard(questions, rank, 2)} for rank in range(2)]
    assert [q.index for q in shard(questions, 0, 2)] == ["5", "9", "7"]
    assert [q.index for q in shard(questions, 1, 2)] == ["3", "1"]
    assert merge(questions, parts[::-1]) == ["p5", "p3", "p9", "p1", "p7"]  # TSV order, not rank order
    with pytest.raises(MmzooError, match="no prediction for 1"):
        merge(questions, parts[:1] + [{"3": "x"}])


def test_evaluate_writes_reports_and_resumes(tmp_path):
    ai2d = get_dataset("ai2d_test")
    questions = read_tsv(write_tsv(tmp_path / "a.tsv", ai2d_rows(), COLUMNS), ai2d)
    answers = {"10": "A", "11": "The answer is B", "12": "(A)", "13": "red", "14": "no idea"}
    out = tmp_path / "out"
    calls: list[str] = []

    def interrupted(batch):
        if calls:
            raise KeyboardInterrupt
        return fake_generator(answers, calls)(batch)

    with pytest.raises(KeyboardInterrupt):
        evaluate(questions, ai2d, interrupted, out, batch_size=2, log=lambda line: None)
    assert read_cache(out, {q.index for q in questions}) == {"10": "A", "11": "The answer is B"}
    with (out / "predictions.jsonl").open("a") as f:
        f.write('{"index": "12", "predic')  # a torn line from the interruption
    calls.clear()
    summary = evaluate(
        questions, ai2d, fake_generator(answers, calls), out, batch_size=2, log=lambda line: None
    )
    assert calls == ["12", "13", "14"]  # only the uncached questions
    # answers A B C A B; extracted A B A A(red) none -> 3 of 5
    assert summary["score"] == 60.0 and summary["count"] == 5 and summary["unparsed"] == 1
    assert summary["categories"] == {
        "colors": {"score": 66.67, "count": 3},
        "shapes": {"score": 50.0, "count": 2},
    }
    with (out / "ai2d_test_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["index"] for r in rows] == ["10", "11", "12", "13", "14"]
    assert [r["extracted"] for r in rows] == ["A", "B", "A", "A", ""]
    assert [r["unparsed"] for r in rows] == ["False"] * 4 + ["True"]
    assert json.loads((out / "ai2d_test_summary.json").read_text())["score"] == 60.0
    assert (out / "ai2d_test_summary.csv").read_text().splitlines()[1] == "overall,5,60.0"


def test_a_cache_from_another_run_is_refused(tmp_path):
    ai2d, docvqa = get_dataset("ai2d_test"), get_dataset("docvqa_val")
    questions = read_tsv(write_tsv(tmp_path / "a.tsv", ai2d_rows(), COLUMNS), ai2d)
    answers = {"10": "A", "11": "B", "12": "C", "13": "x", "14": "C"}
    out = tmp_path / "out"
    quiet = {"log": lambda line: None}
    evaluate(questions, ai2d, fake_generator(answers, []), out, run={"model_dir": "/m/one"}, **quiet)
    calls: list[str] = []
    evaluate(questions, ai2d, fake_generator(answers, calls), out, run={"model_dir": "/m/one"}, **quiet)
    assert calls == []  # the same run resumes from its cache
    with pytest.raises(MmzooError, match=r"another run \(model_dir: /m/one -> /m/two\): use another --out"):
        evaluate(questions, ai2d, fake_generator(answers, calls), out, run={"model_dir": "/m/two"}, **quiet)
    with pytest.raises(MmzooError, match=r"dataset: ai2d_test -> docvqa_val"):
        evaluate(questions, docvqa, fake_generator(answers, calls), out, run={"model_dir": "/m/one"}, **quiet)
    assert calls == []
    for path in out.glob("predictions*.jsonl"):
        path.unlink()  # as the message says: answer again
    evaluate(questions, ai2d, fake_generator(answers, calls), out, run={"model_dir": "/m/two"}, **quiet)
    assert len(calls) == 5 and json.loads((out / "eval_run.json").read_text())["model_dir"] == "/m/two"


def test_score_subcommand_rescoring_results_and_joining_predictions(tmp_path, capsys):
    ai2d = get_dataset("ai2d_test")
    tsv = write_tsv(tmp_path / "a.tsv", ai2d_rows(), COLUMNS)
    questions = read_tsv(tsv, ai2d)
    answers = {"10": "A", "11": "B", "12": "C", "13": "x", "14": "C"}
    out = tmp_path / "out"
    evaluate(questions, ai2d, fake_generator(answers, []), out, log=lambda line: None)
    capsys.readouterr()
    assert (
        main(["eval", "score", "--dataset", "ai2d_test", "--predictions", str(out / "ai2d_test_results.csv")])
        == 0
    )
    first = capsys.readouterr().out
    assert first.startswith("ai2d_test accuracy: 60.00 over 5 questions (1 unparsed")
    predictions = out / "predictions.jsonl"
    assert (
        main(
            ["eval", "score", "--dataset", "ai2d_test", "--predictions", str(predictions), "--data", str(tsv)]
        )
        == 0
    )
    assert capsys.readouterr().out == first
    assert main(["eval", "score", "--dataset", "ai2d_test", "--predictions", str(predictions)]) == 2
    assert "no 'answer' column; pass the benchmark TSV with --data" in capsys.readouterr().err


def test_two_process_gloo_merge(tmp_path):
    """torchrun-style: two processes with RANK/WORLD_SIZE, gloo gather, merged in TSV order."""
    tsv = write_tsv(tmp_path / "a.tsv", ai2d_rows(), COLUMNS)
    script = tmp_path / "worker.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, json
            from mmzoo.eval.datasets import get_dataset, read_tsv
            from mmzoo.eval.run import evaluate
            ds = get_dataset("ai2d_test")
            qs = read_tsv({str(tsv)!r}, ds)
            def gen(batch):
                return [f"rank{{os.environ['RANK']}} " + "ABCAB"[int(q.index) - 10] for q in batch]
            s = evaluate(qs, ds, gen, {str(tmp_path / "out")!r}, batch_size=1, log=lambda line: None)
            if s is not None:
                print(json.dumps(s))
            """
        )
    )
    env = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(29500 + (hash(str(tmp_path)) % 2000)),
        "WORLD_SIZE": "2",
    }
    import os

    procs = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env={**os.environ, **env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert json.loads(outputs[0])["score"] == 100.0 and outputs[1] == ""
    with (tmp_path / "out" / "ai2d_test_results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["index"] for r in rows] == ["10", "11", "12", "13", "14"]
    assert [r["prediction"][:5] for r in rows] == ["rank0", "rank1", "rank0", "rank1", "rank0"]


def test_mmmu_image_tags_become_placeholders_in_order():
    from mmzoo.eval.datasets import place_images

    prompt = "Compare <image 2> with <image 1>.\nOptions:\nA. <image 3>"
    text, images = place_images(prompt, ["one", "two", "three", "four"])
    assert text == "<image>Compare <image> with <image>.\nOptions:\nA. <image>"
    assert images == ["four", "two", "one", "three"]
    assert place_images("No tags here.", ["a", "b"]) == ("No tags here.", ["a", "b"])
    assert place_images("Bad <image 9> tag", ["a"]) == ("Bad <image 9> tag", ["a"])
