"""Generation with the KV cache against transformers' ``generate`` on the same tiny weights."""

from __future__ import annotations

import pytest
import torch
from tiny_hf import infer_args, left_pad, make_sample, token_types

import mmzoo
from mmzoo.infer import SamplingConfig, _process_logits, generate
from mmzoo_qwen2_5_vl.compat import hf_forward, media_batch

NEW = 12
CASES = {
    "image": dict(images=[(1, 8, 12)]),
    "video": dict(videos=[(2, 4, 4)], seconds=[0.75]),
    "image_and_video": dict(images=[(1, 4, 6)], videos=[(2, 4, 4)], seconds=[0.5]),
    "text_only": dict(),
}


@pytest.fixture(scope="module")
def mm_model(hf_dir):
    return mmzoo.load_model(hf_dir).eval()


def run(mm_model, batch, attention_mask=None, **kwargs):
    """:func:`generate` on a batch from ``make_sample``: ``input_ids`` and the media tensors."""
    media = {k: v for k, v in batch.items() if k != "input_ids"}
    return generate(mm_model, batch["input_ids"], attention_mask, media=media, **kwargs)


def recorder(logits: list[torch.Tensor]):
    """An ``on_step`` that keeps each step's logits."""
    return lambda tokens, step_logits: logits.append(step_logits)


def hf_generate(hf_model, batch, attention_mask=None, **kwargs):
    out = hf_model.generate(
        **batch,
        attention_mask=attention_mask,
        mm_token_type_ids=token_types(batch["input_ids"]),
        do_sample=False,
        max_new_tokens=NEW,
        min_new_tokens=NEW,  # the tiny vocab holds no eos; never stop early
        output_logits=True,
        return_dict_in_generate=True,
        **kwargs,
    )
    return out.sequences[:, batch["input_ids"].shape[1] :], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
@pytest.mark.parametrize("case", CASES)
def test_greedy_equals_transformers(case, penalty, hf_model, mm_model):
    batch = make_sample(**CASES[case])
    expected, expected_logits = hf_generate(hf_model, batch, repetition_penalty=penalty)
    logits: list[torch.Tensor] = []
    ours = run(
        mm_model,
        batch,
        sampling=SamplingConfig(max_new_tokens=NEW, repetition_penalty=penalty),
        on_step=recorder(logits),
    )
    assert ours == expected.tolist()
    torch.testing.assert_close(torch.stack(logits, dim=1), expected_logits, atol=1e-4, rtol=1e-4)


def left_padded_pair():
    a = make_sample(images=[(1, 8, 12)], seed=1)
    b = make_sample(images=[(1, 4, 4)], videos=[(2, 4, 4)], seconds=[0.5], seed=2)
    return left_pad(a, b)


def test_left_padded_batch_equals_transformers(hf_model, mm_model):
    batch, mask = left_padded_pair()
    expected, expected_logits = hf_generate(hf_model, batch, attention_mask=mask)
    logits: list[torch.Tensor] = []
    ours = run(mm_model, batch, mask, sampling=SamplingConfig(max_new_tokens=NEW), on_step=recorder(logits))
    assert ours == expected.tolist()
    torch.testing.assert_close(torch.stack(logits, dim=1), expected_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "media",
    [
        dict(images=[(1, 8, 12)], videos=[(2, 4, 4)], seconds=[0.5]),
        # a video whose time row (0..14) runs far past its 2x2 merged grid: the rope delta is the
        # trained rule's (max + 1 - length), which transformers 5.3+ would not give
        dict(images=[(1, 4, 4)], videos=[(8, 4, 4)], seconds=[1.0]),
    ],
)
def test_cached_decode_equals_full_forward(mm_model, media):
    """Teacher forcing: the cached step logits equal a fresh forward over prompt + generated ids."""
    batch = make_sample(**media, seed=3)
    logits: list[torch.Tensor] = []
    ours = run(mm_model, batch, sampling=SamplingConfig(max_new_tokens=6), on_step=recorder(logits))
    full = dict(batch, input_ids=torch.cat([batch["input_ids"], torch.tensor(ours)], dim=1))
    with torch.no_grad():
        reference = hf_forward(mm_model, **full).logits[0, batch["input_ids"].shape[1] - 1 : -1]
    torch.testing.assert_close(torch.cat(logits), reference, atol=1e-5, rtol=1e-4)


def test_stops_at_stop_token_per_row(mm_model):
    batch, mask = left_padded_pair()
    free = run(mm_model, batch, mask, sampling=SamplingConfig(max_new_tokens=NEW))
    stop = free[0][2]
    stopped = run(mm_model, batch, mask, sampling=SamplingConfig(max_new_tokens=NEW, stop_token_ids=(stop,)))
    assert stopped[0] == free[0][: free[0].index(stop) + 1]
    assert stopped[1] == (free[1][: free[1].index(stop) + 1] if stop in free[1] else free[1])


def test_positions_from_the_pipeline_equal_those_of_the_padded_batch(mm_model):
    """Per-sample positions (the data pipeline's) left-padded by the collator are what generate
    would compute on the padded batch, so passing them changes nothing."""
    from mmzoo.data.collate import collate_left_padded

    grid_keys = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
    rows = []
    for sample in (make_sample(images=[(1, 8, 12)], seed=1), make_sample(videos=[(8, 4, 4)], seconds=[1.0])):
        grids = {k: sample.get(k) for k in grid_keys}
        positions = mm_model.compute_position_ids(mm_model.config, sample["input_ids"], media=grids)[:, 0]
        media = {k: v for k, v in sample.items() if k != "input_ids"}
        rows.append({"input_ids": sample["input_ids"][0], "position_ids": positions, "media": media})
    batch = collate_left_padded(rows, 0)
    mask, positions = batch.pop("attention_mask"), batch.pop("position_ids")
    batch = {"input_ids": batch["input_ids"], **batch["media"]}
    expected = mm_model.compute_position_ids(
        mm_model.config, batch["input_ids"], attention_mask=mask, media=batch
    )
    assert torch.equal(positions, expected)
    given: list[torch.Tensor] = []
    computed: list[torch.Tensor] = []
    sampling = SamplingConfig(max_new_tokens=4)
    ours = run(mm_model, batch, mask, position_ids=positions, sampling=sampling, on_step=recorder(given))
    assert ours == run(mm_model, batch, mask, sampling=sampling, on_step=recorder(computed))
    assert torch.equal(torch.stack(given), torch.stack(computed))


def test_transformers_style_media_names_unknown_arguments():
    batch = make_sample(images=[(1, 4, 4)])
    with pytest.raises(
        TypeError, match=r"unknown Qwen2.5-VL media arguments \['pixel_value'\]; known: pixel_values, "
    ):
        media_batch(pixel_value=batch["pixel_values"])


def test_chat_prompt_is_the_training_sample_up_to_the_answer():
    """A prompt is prepared by the data pipeline: the same ids, positions and pixels as the
    training sample of that conversation, which goes on with the answer."""
    from mmzoo.config import DataConfig
    from mmzoo.data.pipeline import Preprocessor
    from mmzoo.data.records import Record, SkipReport
    from mmzoo.infer import Chat, Request

    model = mmzoo.build_model("qwen2_5_vl", "tiny")
    media = {"max_pixels": 64 * 28 * 28, "video_min_pixels": 8 * 28 * 28, "video_max_pixels": 16 * 28 * 28}
    chat = Chat(model, **media)
    image, video = "core/mmzoo/demo/chelsea.jpg", "core/mmzoo/demo/pan.mp4"
    asked = chat.encode(Request("What moves?", [image], [video], system="Be brief."))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "<image><video>What moves?"},  # where infer puts media by default
        {"role": "assistant", "content": "The camera."},
    ]
    training = Preprocessor(chat.preprocessor.spec, model.config, chat.tokenizer, DataConfig(media=media))
    trained = training.to_sample(training.prepare(Record(messages, [image], [video]), SkipReport()))
    n = len(asked)
    assert torch.equal(asked.input_ids, trained.input_ids[:n])
    assert torch.equal(asked.position_ids, trained.position_ids[:, :n])
    assert asked.media.keys() == set(chat.preprocessor.processor.media_keys)
    for key, value in asked.media.items():
        assert torch.equal(value, trained.media[key]), key
    assert chat.tokenizer.decode(trained.input_ids[n:]) == "The camera.<|im_end|>\n"
    assert chat.tokenizer.decode(asked.input_ids[-3:]) == "<|im_start|>assistant\n"


def test_chat_prompts_are_never_truncated():
    """Training cuts samples at ``data.seq_length`` (2048 by default); a prompt is kept whole."""
    from mmzoo.infer import Chat, Request

    chat = Chat(mmzoo.build_model("qwen2_5_vl", "tiny"))
    asked = chat.encode(Request("hello " * 3000))
    assert len(asked) > 3000
    assert chat.tokenizer.decode(asked.input_ids[-3:]) == "<|im_start|>assistant\n"


def test_sampling_is_seeded_and_filters():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool)
    config = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9, seed=1)
    draws = [
        _process_logits(logits, seen, config, torch.Generator().manual_seed(1)).tolist() for _ in range(2)
    ]
    assert draws[0] == draws[1]
    top5 = logits.topk(5).indices
    for _ in range(20):
        tokens = _process_logits(logits, seen, config, None)
        assert all(t in top5[row] for row, t in enumerate(tokens.tolist()))
    greedy = _process_logits(logits, seen, SamplingConfig(), None)
    assert torch.equal(greedy, logits.argmax(-1))
    peaked = torch.full((1, 50), -10.0)
    peaked[0, 7] = 10.0
    assert _process_logits(peaked, seen[:1], SamplingConfig(temperature=1.0, top_p=0.5), None).item() == 7


def test_bad_sampling_values_are_named():
    with pytest.raises(mmzoo.MmzooError, match="top_p"):
        SamplingConfig(top_p=0)


@pytest.mark.parametrize("stream", [True, False])
def test_infer_cli_answers_and_stops_at_end_of_turn(hello_dir, capsys, stream):
    from mmzoo.cli import main

    args = infer_args(hello_dir, "--image", "core/mmzoo/demo/chelsea.jpg", "--prompt", "Who is there?")
    assert main(args + ([] if stream else ["--no-stream"])) == 0
    assert capsys.readouterr().out == "Hello\n"  # without the stop it would go on: "HelloHello..."


def test_infer_cli_jsonl_batches(hello_dir, tmp_path, capsys):
    import json
    import shutil

    from mmzoo.cli import main

    shutil.copy("core/mmzoo/demo/chelsea.jpg", tmp_path / "cat.jpg")
    requests = [
        {"id": "a", "prompt": "What is it?", "images": ["cat.jpg"]},
        {"id": "b", "prompt": "Say hi."},
        {"id": "c", "prompt": "<image> and <image>: same?", "images": ["cat.jpg", "cat.jpg"]},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in requests))
    out = tmp_path / "out.jsonl"
    assert main(infer_args(hello_dir, "--input", str(src), "--output", str(out), "--batch-size", "2")) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    assert [r["response"] for r in rows] == ["Hello"] * 3


def test_infer_cli_on_a_converted_checkpoint_uses_its_tokenizer(hello_dir, tmp_path, capsys):
    from mmzoo.checkpoint.conversion import hf_to_mm
    from mmzoo.cli import main

    mm_dir = hf_to_mm(hello_dir, tmp_path / "mm", report=lambda line: None)
    assert main(infer_args(mm_dir, "--prompt", "Who is there?")) == 0
    captured = capsys.readouterr()
    assert captured.out == "Hello\n" and "no tokenizer files" not in captured.err  # from hf_assets/


def test_infer_cli_errors_are_one_line(hello_dir, tmp_path, capsys):
    from mmzoo.cli import main

    assert main(infer_args(hello_dir, "--image", str(tmp_path / "nope.jpg"), "--prompt", "x")) == 2
    err = capsys.readouterr().err
    assert "nope.jpg: no such media file" in err and err.count("\n") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"images": []}\n')
    assert main(infer_args(hello_dir, "--input", str(bad), "--output", str(tmp_path / "o.jsonl"))) == 2
    assert 'bad.jsonl:2: a request needs a string "prompt"' in capsys.readouterr().err


def test_streamer_never_emits_half_a_character():
    from mmzoo.infer import _Streamer

    tokenizer = mmzoo.get_model("qwen2_5_vl").default_tokenizer()
    ids = tokenizer.encode("猫 naps")
    pieces: list[str] = []
    streamer = _Streamer(tokenizer, pieces.append)
    for token in ids:
        streamer.step([token], torch.zeros(1, 1))
    assert "".join(pieces) == "猫 naps"
    assert all("\ufffd" not in p for p in pieces)


def test_eval_cli_end_to_end(hello_dir, tmp_path, capsys):
    """`mmzoo eval` on a two-row TSV: the model answers "Hello" to everything."""
    import base64
    import csv
    import io
    import json

    from PIL import Image

    from mmzoo.cli import main

    buffer = io.BytesIO()
    Image.open("core/mmzoo/demo/chelsea.jpg").resize((56, 56)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    rows = [
        {
            "index": "1",
            "image": image,
            "question": "Greeting?",
            "A": "Bye",
            "B": "No",
            "C": "Hello",
            "answer": "C",
        },
        {
            "index": "2",
            "image": "1",
            "question": "Farewell?",
            "A": "Bye",
            "B": "No",
            "C": "Hello",
            "answer": "A",
        },
    ]
    tsv = tmp_path / "ai2d.tsv"
    with tsv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "out"
    args = [
        "eval",
        "--model-dir",
        str(hello_dir),
        "--dataset",
        "ai2d_test",
        "--data",
        str(tsv),
        "--out",
        str(out),
        "--max-pixels",
        "12544",
        "--max-new-tokens",
        "4",
        "--repetition-penalty",
        "2",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("ai2d_test accuracy: 50.00 over 2 questions")
    assert ("mmzoo: warning: openpyxl is not installed" in captured.err) == _no_openpyxl()
    summary = json.loads((out / "ai2d_test_summary.json").read_text())
    assert summary["score"] == 50.0
    cached = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert cached == [{"index": "1", "prediction": "Hello"}, {"index": "2", "prediction": "Hello"}]


def _no_openpyxl() -> bool:
    import importlib.util

    return importlib.util.find_spec("openpyxl") is None
