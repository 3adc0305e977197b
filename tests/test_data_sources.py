"""Data without a model: the synthetic MedPix-shaped set, dataset formats → Samples, the DP sampler."""

from __future__ import annotations

import base64
import gc
import io
import json
import os
from pathlib import Path

import datasets
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from runner.cli import main as cli_main
from runner.data.sample import BadSample
from runner.data.sampler import StepSampler
from runner.data.sources import ConcatSource, load_source
from runner.data.synthetic import make_data
from runner.errors import UserError

from conftest import assert_one_line


@pytest.fixture(scope="module")
def medpix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data(tmp_path_factory.mktemp("medpix"), n=40, seed=0)


def _png(size: tuple[int, int] = (20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


# ---- synthetic data -------------------------------------------------------------------------------


def test_make_data_splits_schema_and_varied_images(medpix: Path) -> None:
    train = datasets.load_dataset(str(medpix), split="train")
    validation = datasets.load_dataset(str(medpix), split="validation")
    assert (len(train), len(validation)) == (40, 4)
    assert train.column_names == ["image_id", "question", "answer"]
    sizes = [img.size for img in train["image_id"]]  # (width, height)
    assert any(w < 64 and h < 64 for w, h in sizes), "a tiny image (upscaled by the processor)"
    assert any(h > 2.5 * w for w, h in sizes), "a tall image"
    assert any(w > 3 * h for w, h in sizes), "a wide image"
    assert any(w * h > 600_000 for w, h in sizes), "a large image (downscaled)"
    assert all(a.strip() for a in train["answer"])


def test_make_data_is_deterministic_and_answers_follow_the_picture(tmp_path: Path) -> None:
    a = datasets.load_dataset(str(make_data(tmp_path / "a", n=12, seed=3)), split="train")
    b = datasets.load_dataset(str(make_data(tmp_path / "b", n=12, seed=3)), split="train")
    assert a["answer"] == b["answer"] and a["question"] == b["question"]
    # same question kind → one of a few template answers: learnable, not random text
    assert len(set(a["answer"])) < len(a)


def test_make_data_cli(tmp_path: Path) -> None:
    assert cli_main(["make-data", str(tmp_path / "d"), "--n", "3", "--seed", "1"]) == 0
    assert len(load_source(str(tmp_path / "d"), "train")) == 3
    assert cli_main(["make-data", str(tmp_path / "e"), "--n", "0"]) == 2


# ---- sources --------------------------------------------------------------------------------------


def test_medpix_folder_with_split_slicing(medpix: Path) -> None:
    source = load_source(str(medpix), "train[:5]")
    assert len(source) == 5
    sample = source[0]
    assert [m["role"] for m in sample.messages] == ["user", "assistant"]
    assert sample.messages[0]["content"][0] == {"type": "image"}
    assert len(sample.images) == 1 and sample.images[0].mode == "RGB"
    assert len(load_source(str(medpix), "train[10%:20%]")) == 4
    text, n_images = source.text_and_images(0)
    assert n_images == 1 and sample.messages[1]["content"][0]["text"] in text


def test_parquet_file_and_save_to_disk(medpix: Path, tmp_path: Path) -> None:
    parquet = medpix / "data" / "validation-00000-of-00001.parquet"
    assert len(load_source(str(parquet), "validation[1:3]")) == 2
    datasets.load_dataset(str(medpix)).save_to_disk(str(tmp_path / "disk"))
    source = load_source(str(tmp_path / "disk"), "validation[:3]")
    assert len(source) == 3 and source[2].images


def test_chat_jsonl_images_by_path_data_uri_bytes_and_text_only(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png((20, 30)))
    b64 = base64.b64encode(_png((7, 9))).decode()
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/a.png"}, {"type": "text", "text": "Q1"}]},
                      {"role": "assistant", "content": "A1"}]},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "image", "image": f"data:image/png;base64,{b64}"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A2"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "bytes": b64}, {"type": "text", "text": "Q3"}]},
                      {"role": "assistant", "content": "A3"}]},
        {"messages": [{"role": "user", "content": "text only"}, {"role": "assistant", "content": "A4"}]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    source = load_source(str(path), "train")
    assert [len(source[i].images) for i in range(4)] == [1, 1, 1, 0]
    assert source[0].images[0].size == (20, 30) and source[1].images[0].size == (7, 9)
    assert source[3].messages == [
        {"role": "user", "content": [{"type": "text", "text": "text only"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A4"}]},
    ]
    assert source.text_and_images(1) == ("Be brief. A2", 1)
    assert len(load_source(str(path), "train[1:]")) == 3


def test_chat_jsonl_openai_image_url_parts(tmp_path: Path) -> None:
    """OpenAI-style `image_url` parts, as an object or a bare string: a data: URI, a file: URL or a path (relative:
    to the file's folder, no '..'); a web URL is a bad sample naming the line, never fetched."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a b.png").write_bytes(_png((20, 30)))
    data_uri = "data:image/png;base64," + base64.b64encode(_png((7, 9))).decode()
    urls = [{"url": data_uri}, data_uri, {"url": "img/a b.png"}, f"file://{(tmp_path / 'img' / 'a%20b.png')}",
            "file:img/a%20b.png", {"url": "https://example.com/x.png", "detail": "low"}, "HTTP://example.com/y.png",
            "file://server/share/a.png", {"url": "../img/a b.png"}, {}]
    lines = [json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": url}, {"type": "text", "text": "Q"}]},
        {"role": "assistant", "content": "A"}]}) for url in urls]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    source = load_source(str(tmp_path / "chat.jsonl"))
    assert [source[i].images[0].size for i in range(5)] == [(7, 9), (7, 9), (20, 30), (20, 30), (20, 30)]
    assert source[0].messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Q"}]
    assert source.text_and_images(0) == ("Q A", 1)
    for index, reason, words in [(5, "image URL not local", ["chat.jsonl:6", "https://example.com/x.png",
                                                             "download it and give a path"]),
                                 (6, "image URL not local", ["chat.jsonl:7", "download it and give a path"]),
                                 (7, "image URL not local", ["chat.jsonl:8", "'server'"]),
                                 (8, "image path outside the dataset", ["chat.jsonl:9", "'..'"]),
                                 (9, "unreadable image", ["chat.jsonl:10", "no image payload"])]:
        with pytest.raises(BadSample) as bad:
            source[index]
        assert bad.value.reason == reason, str(bad.value)
        assert_one_line(str(bad.value), words)


def test_images_decode_as_transformers_loads_them() -> None:
    """16-bit grayscale spans 8 bits instead of clipping to white, transparency lies on white, and the
    EXIF orientation is applied."""
    import numpy as np

    from runner.data.sample import load_image

    buf = io.BytesIO()
    Image.fromarray(np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (8, 1))).save(buf, format="PNG")  # 12-bit ramp
    ramp = np.asarray(load_image(buf.getvalue(), "16-bit"))[0, :, 0]
    assert ramp[0] == 0 and ramp[-1] == 255 and (ramp == 255).sum() == 1
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    clear.putpixel((0, 0), (0, 0, 0, 255))
    buf = io.BytesIO()
    clear.save(buf, format="PNG")
    rgb = load_image(buf.getvalue(), "alpha")
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((3, 3)) == (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to view
    buf = io.BytesIO()
    Image.new("RGB", (40, 20)).save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue(), "exif").size == (20, 40)


def test_chat_table_images_inline_and_from_the_images_column(tmp_path: Path) -> None:
    """A parquet chat table whose rows mix an inline image path (relative: to the table's folder) with
    bare image parts that take the row's `images` in order; Arrow gives every part every field."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png((11, 11)))
    rows = [
        {"messages": [{"role": "user", "content": [{"type": "image", "path": "imgs/a.png"},
                                                   {"type": "text", "text": "q"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "a"}]}], "images": []},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "a"}]}],
         "images": [{"bytes": _png((12, 12)), "path": None}, {"bytes": _png((13, 13)), "path": None}]},
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "chat.parquet"))
    source = load_source(str(tmp_path / "chat.parquet"))
    assert [im.size for im in source[0].images] == [(11, 11)]
    assert [im.size for im in source[1].images] == [(12, 12), (13, 13)]


def test_eval_on_the_training_file_needs_disjoint_slices(medpix: Path, tmp_path: Path) -> None:
    """A single file has one split, so `validation` of the training file would be all of it."""
    from runner.data.sources import same_rows

    chat = tmp_path / "chat.jsonl"
    chat.write_text("")
    assert same_rows((str(chat), "train"), (str(chat), "validation"))
    assert not same_rows((str(chat), "train[:90%]"), (str(chat), "train[90%:]"))
    assert not same_rows((str(medpix), "train"), (str(medpix), "validation"))  # a folder with real splits


def test_eval_fraction_holds_out_the_tail_of_the_training_split(medpix: Path, tmp_path: Path) -> None:
    """The tiny recipe evaluates on the last 10% of whatever data.train is (cut as `train[90%:]` cuts, the
    same rows every run), trained on the rest; a named data.eval takes precedence and trains on the whole split."""
    from runner.config import load_config
    from runner.preflight import data_sources

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "tiny_demo.yaml"
    train, held_out = data_sources(load_config(recipe, [f"data.train={medpix}"]))
    assert (len(train), len(held_out)) == (36, 4)
    for rows, split in [(train, "train[:90%]"), (held_out, "train[90%:]")]:
        sliced = load_source(str(medpix), split)
        assert len(rows) == len(sliced)
        assert all(rows.text_and_images(i) == sliced.text_and_images(i) for i in range(len(rows)))
    assert held_out[0].key.endswith("row 36") and held_out[-1].key.endswith("row 39")
    with pytest.raises(IndexError):
        held_out[4]
    train, named = data_sources(load_config(recipe, [f"data.train={medpix}", f"data.eval={medpix}"]))
    assert (len(train), len(named)) == (40, 4) and named[0].key.startswith(f"{medpix}[validation]")
    train, off = data_sources(load_config(recipe, [f"data.train={medpix}", "eval.every_steps=0"]))
    assert (len(train), off) == (36, None)  # held out whether or not eval runs: the same training rows
    chat = tmp_path / "chat.jsonl"
    chat.write_text("\n".join(_chat(f"A{i}") for i in range(3)))
    with pytest.raises(UserError) as none_left:
        data_sources(load_config(recipe, [f"data.train={chat}"]))
    assert_one_line(str(none_left.value), ["data.eval_fraction 0.1 of its 3 rows holds out none"])
    with pytest.raises(UserError, match=r"data.eval_fraction must be in \[0, 1\)"):
        load_config(recipe, ["data.eval_fraction=1"])


def test_mixed_stream_of_image_and_text_only_sources(medpix: Path, tmp_path: Path) -> None:
    path = tmp_path / "text.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}))
    mixed = ConcatSource([load_source(str(medpix), "train[:3]"), load_source(str(path))])
    assert len(mixed) == 4
    assert [len(mixed[i].images) for i in range(4)] == [1, 1, 1, 0]
    with pytest.raises(IndexError):
        mixed[4]


def test_bad_rows_raise_bad_sample_when_read(tmp_path: Path) -> None:
    features = datasets.Features({"image_id": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")})
    rows = {
        "image_id": [{"bytes": b"not a png", "path": None}, {"bytes": _png(), "path": None}, {"bytes": _png(), "path": None}],
        "question": ["q", "q", "q"],
        "answer": ["fine", "  ", "fine"],
    }
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "bad.parquet"))
    source = load_source(str(tmp_path / "bad.parquet"), "train")
    with pytest.raises(BadSample) as unreadable:
        source[0]
    with pytest.raises(BadSample) as empty:
        source[1]
    assert (unreadable.value.reason, empty.value.reason) == ("unreadable image", "empty answer")
    assert source[2].images[0].size == (20, 30)
    message = assert_one_line(str(unreadable.value), ["bad.parquet[train] row 0", "image of 9 bytes could not be "
                                                      "decoded (not in an image format PIL reads)"])
    assert "BytesIO" not in message and "0x" not in message


def test_an_image_that_cannot_be_decoded_names_the_sample_and_the_image(tmp_path: Path) -> None:
    """Base64 bytes, a file, datasets' {bytes, path} value, a truncated PNG, a missing file: each message names the
    line and the image (its path, or its size), says it could not be decoded or read, and never PIL's buffer."""
    (tmp_path / "junk.png").write_bytes(b"GIF89a but not really")
    (tmp_path / "cut.png").write_bytes(_png()[:60])
    parts = [{"type": "image", "bytes": base64.b64encode(b"\x00" * 40).decode()}, {"type": "image", "path": "junk.png"},
             {"type": "image", "bytes": base64.b64encode(b"nope").decode(), "path": "scan_17.png"},
             {"type": "image", "path": "cut.png"}, {"type": "image", "path": "gone.png"}]
    lines = [json.dumps({"messages": [{"role": "user", "content": [part]}, {"role": "assistant", "content": "A"}]})
             for part in parts]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    source = load_source(str(tmp_path / "chat.jsonl"))
    expected = [["chat.jsonl:1", "image of 40 bytes could not be decoded (not in an image format PIL reads)"],
                ["chat.jsonl:2", f"image {tmp_path / 'junk.png'} could not be decoded"],
                ["chat.jsonl:3", "image scan_17.png could not be decoded"],
                ["chat.jsonl:4", f"image {tmp_path / 'cut.png'} could not be decoded"],
                ["chat.jsonl:5", f"image {tmp_path / 'gone.png'} could not be read (No such file or directory)"]]
    for index, words in enumerate(expected):
        with pytest.raises(BadSample) as bad:
            source[index]
        assert bad.value.reason == "unreadable image"
        assert "BytesIO" not in assert_one_line(str(bad.value), words)


def _open_paths() -> set[str]:
    """What this process's file descriptors point at."""
    paths = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the descriptor listdir itself used
            pass
    return paths


def test_a_jsonl_source_closes_its_file_and_stays_readable_in_forked_workers(tmp_path: Path) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(_chat(f"A{i}") for i in range(6)) + "\n")
    with load_source(str(path)) as source:
        assert source[0].messages[-1]["content"][0]["text"] == "A0" and str(path) in _open_paths()
    assert str(path) not in _open_paths()
    source = load_source(str(path))
    source[1]  # the parent opens its descriptor before the workers fork, then closes it while they read
    loader = DataLoader(source, batch_size=2, num_workers=2, multiprocessing_context="fork",
                        collate_fn=lambda items: [s.messages[-1]["content"][0]["text"] for s in items])
    batches = iter(loader)  # the workers fork here
    source.close()
    assert str(path) not in _open_paths()
    assert list(batches) == [["A0", "A1"], ["A2", "A3"], ["A4", "A5"]]
    assert source[5].messages[-1]["content"][0]["text"] == "A5"  # read again: opened again
    del source, loader, batches
    gc.collect()
    assert str(path) not in _open_paths()


def _chat(answer: str) -> str:
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages}, ensure_ascii=False)


def test_malformed_jsonl_lines_are_bad_samples_of_their_line(tmp_path: Path) -> None:
    """A line that is not UTF-8, not JSON or has no `messages` is a bad sample naming file and line,
    like any row's problem, not a refused dataset; blank lines are no rows, the others keep their
    indices, and a slice counts the bad lines as rows too."""
    path = tmp_path / "chat.jsonl"
    lines = [_chat("A0").encode(), b"", b"{not json", _chat("A3").encode(), b'{"text": "no messages"}',
             _chat("caf\xe9").encode("latin-1"), b"[1, 2]", "\ufeff".encode() + _chat("A7").encode()]
    path.write_bytes(b"\r\n".join(lines))
    source = load_source(str(path))
    assert len(source) == 7
    assert [source[i].messages[1]["content"][0]["text"] for i in (0, 2)] == ["A0", "A3"]
    problems = {1: "chat.jsonl:3: not valid JSON", 3: 'chat.jsonl:5: expected an object with a "messages"',
                4: "chat.jsonl:6: not UTF-8 (b'\\xe9' at byte 87 of", 5: 'chat.jsonl:7: expected an object'}
    for index, words in problems.items():
        with pytest.raises(BadSample) as bad:
            source[index]
        assert bad.value.reason == "malformed line" and words in str(bad.value), str(bad.value)
        assert source.text_and_images(index) == ("", 0)
    assert source[6].messages[1]["content"][0]["text"] == "A7"  # a BOM is not part of the JSON
    tail = load_source(str(path), "train[4:]")
    assert len(tail) == 3 and tail[2].key == "chat.jsonl:8"


def test_image_paths_may_not_climb_out_of_the_dataset_folder(tmp_path: Path) -> None:
    """A relative image path with `..` (out of the dataset's folder, into the host's files) is a bad
    sample naming the row; an absolute path is the user's own choice and stays allowed."""
    (tmp_path / "outside.png").write_bytes(_png((5, 6)))
    data = tmp_path / "data"
    (data / "imgs").mkdir(parents=True)
    (data / "imgs" / "in.png").write_bytes(_png((7, 8)))
    (data / "imgs" / "up").symlink_to(tmp_path)  # a linked folder cannot be climbed out of either
    paths = ["imgs/in.png", "../outside.png", "../../../../etc/passwd", "imgs/up/../../outside.png",
             str(tmp_path / "outside.png")]
    datasets.Dataset.from_dict({"image_id": paths, "question": ["q"] * 5, "answer": ["a"] * 5}).to_parquet(
        str(data / "vqa.parquet"))
    chat = {"messages": [{"role": "user", "content": [{"type": "image", "image": "../outside.png"}]},
                         {"role": "assistant", "content": "a"}]}
    (data / "chat.jsonl").write_text(json.dumps(chat))
    table = load_source(str(data / "vqa.parquet"))
    assert [table[i].images[0].size for i in (0, 4)] == [(7, 8), (5, 6)]
    for source, index, path in [(table, 1, "../outside.png"), (table, 2, "../../../../etc/passwd"),
                                (table, 3, "imgs/up/../../outside.png"), (load_source(str(data / "chat.jsonl")), 0,
                                                                         "../outside.png")]:
        with pytest.raises(BadSample) as escaped:
            source[index]
        assert escaped.value.reason == "image path outside the dataset", str(escaped.value)
        assert_one_line(str(escaped.value), [f"row {index}" if source is table else "chat.jsonl:1", repr(path),
                                             "absolute path"])


def test_load_errors_are_one_clear_line(medpix: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{not json\n\n{"text": "a"}\n')
    with pytest.raises(UserError) as no_chat:
        load_source(str(bad))
    assert_one_line(str(no_chat.value), ["bad.jsonl: no line is a chat object", "bad.jsonl:1: not valid JSON",
                                         '{"messages": [...]} JSON object per line'])
    bad.write_text('{"messages": []}\n')
    with pytest.raises(UserError, match="bad split"):
        load_source(str(bad), "train[x]")
    datasets.Dataset.from_dict({"text": ["a"]}).to_parquet(str(tmp_path / "other.parquet"))
    with pytest.raises(UserError, match=r"expected MedPix-VQA \['image_id', 'question', 'answer'\] or chat"):
        load_source(str(tmp_path / "other.parquet"))
    with pytest.raises(UserError, match="cannot load dataset"):
        load_source(str(tmp_path / "missing-folder"))
    with pytest.raises(UserError, match="split 'test'"):
        load_source(str(medpix), "test")


# ---- sampler --------------------------------------------------------------------------------------


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def test_sampler_same_seed_same_order_new_epoch_new_order() -> None:
    a = StepSampler(50, micro_batch_size=2, grad_accum_steps=3, dp_size=2, dp_rank=1, seed=7)
    b = StepSampler(50, micro_batch_size=2, grad_accum_steps=3, dp_size=2, dp_rank=1, seed=7)
    assert a.epoch(0) == b.epoch(0) and a.epoch(3) == b.epoch(3)
    assert a.epoch(0) != a.epoch(1)
    assert a.epoch(0) != StepSampler(50, 2, 3, dp_size=2, dp_rank=1, seed=8).epoch(0)


def test_sampler_dp_shards_partition_each_global_batch() -> None:
    n, mbs, ga, dp = 103, 2, 3, 4
    ranks = [StepSampler(n, mbs, ga, dp_size=dp, dp_rank=r, seed=1) for r in range(dp)]
    per_rank = [s.epoch(0) for s in ranks]
    assert all(len(b) == ranks[0].micro_batches_per_epoch == 4 * ga for b in per_rank)
    assert all(len(mb) == mbs for b in per_rank for mb in b)
    for step in range(ranks[0].steps_per_epoch):  # one optimizer step: disjoint across ranks
        step_ids = [_flat(b[step * ga : (step + 1) * ga]) for b in per_rank]
        assert len(set(_flat(step_ids))) == mbs * ga * dp
    everything = _flat([_flat(b) for b in per_rank])
    assert len(everything) == len(set(everything)) == 4 * mbs * ga * dp  # whole epoch: no repeats


def test_sampler_depends_only_on_the_dp_coordinate() -> None:
    """Every TP rank / pipeline stage of one replica builds its sampler from (seed, dp_rank, dp_size)
    only, so separately built samplers agree; other replicas differ."""
    tp_ranks = [StepSampler(64, 2, 2, dp_size=2, dp_rank=1, seed=3) for _ in range(4)]
    assert all(s.epoch(e) == tp_ranks[0].epoch(e) for s in tp_ranks for e in range(3))
    other = StepSampler(64, 2, 2, dp_size=2, dp_rank=0, seed=3)
    assert not set(_flat(other.epoch(0))) & set(_flat(tp_ranks[0].epoch(0)))


def test_sampler_length_grouping_keeps_the_samples_and_cuts_padding() -> None:
    lengths = [(i * 37) % 300 + 10 for i in range(256)]

    def windows(lengths: list[int] | None) -> list[list[int]]:
        """Samples of each 4-step window, over both DP ranks."""
        ranks = [StepSampler(256, 4, 2, dp_size=2, dp_rank=r, lengths=lengths, group_window_steps=4).epoch(0) for r in range(2)]
        per_window = 4 * 2  # steps × grad_accum micro-batches per rank
        return [sorted(_flat(_flat(e[w : w + per_window]) for e in ranks)) for w in range(0, len(ranks[0]), per_window)]

    def waste(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert windows(lengths) == windows(None)
    plain = StepSampler(256, 4, 2, dp_size=2).epoch(0)
    grouped = StepSampler(256, 4, 2, dp_size=2, lengths=lengths, group_window_steps=4).epoch(0)
    assert waste(grouped) < 0.5 * waste(plain)


@pytest.mark.parametrize("grouped", [False, True])
def test_eval_sampler_keeps_the_tail(grouped: bool) -> None:
    """keep_tail (evaluation): 27 samples in global batches of 8 → 4 steps, 5 empty sample slots;
    every sample once over both DP ranks, each rank still gets grad_accum_steps micro-batches a step
    (two of them empty). Ungrouped, the tail is the last step and the whole global batches are the
    ones the training sampler makes; grouped, the empty slots sort last in their window."""
    lengths = [(i * 7) % 11 + 1 for i in range(27)] if grouped else None
    ranks = [StepSampler(27, 2, 2, dp_size=2, dp_rank=r, seed=3, lengths=lengths, keep_tail=True) for r in range(2)]
    assert ranks[0].steps_per_epoch == 4 and StepSampler(27, 2, 2, dp_size=2).steps_per_epoch == 3
    epochs = [s.epoch(0) for s in ranks]
    assert all(len(e) == 4 * 2 for e in epochs)
    assert sorted(i for e in epochs for mb in e for i in mb) == list(range(27))
    assert sorted(len(mb) for e in epochs for mb in e) == [0, 0, 1] + [2] * 13
    if not grouped:
        assert sum(len(mb) for e in epochs for mb in e[6:]) == 3
        assert [e[:6] for e in epochs] == [StepSampler(27, 2, 2, dp_size=2, dp_rank=r, seed=3).epoch(0) for r in range(2)]
    assert StepSampler(1, 4, 4, dp_size=2, keep_tail=True).epoch(0) == [[0], [], [], []]


def test_sampler_rejects_bad_layouts() -> None:
    with pytest.raises(UserError, match="fewer than one global batch"):
        StepSampler(7, 2, 2, dp_size=2)
    with pytest.raises(UserError, match="has no samples"):
        StepSampler(0, 2, 2, keep_tail=True)
    with pytest.raises(UserError, match="dp_rank 2"):
        StepSampler(70, 2, 2, dp_size=2, dp_rank=2)
    with pytest.raises(UserError, match="3 lengths for 70 samples"):
        StepSampler(70, 2, 2, lengths=[1, 2, 3])
