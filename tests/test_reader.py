"""The streaming reader: lossless round-trips, alignment errors, node/worker splitting, shuffling, resampling,
corrupt shards (raise vs skip), plain webdataset / tar compatibility, never unpickling shard content, and the tar
stage reading every header as tarfile does."""

import io
import json
import os
import pickle
import subprocess
import tarfile
from itertools import islice

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from shards import format as F
from shards.reader import AlignmentError, ShardDataset, iter_shard, iter_shard_members, to_torch
from shards.writer import ShardWriter, stats_path, tar_path

MODS = ["rgb", "depth", "semseg"]
COUNTS = [6, 5, 7, 4, 6]  # uneven on purpose: 28 samples in 5 shards
NUM_CLASSES = 7
H, W = 24, 32


def make_sample(seed: int) -> dict:
    """Smooth rgb (so JPEG error is small), float depth, semseg ids and a class, all deterministic per seed."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    rgb = np.asarray(coarse.resize((W, H), Image.BILINEAR))
    depth = rng.uniform(0.5, 12.0, (H, W)).astype(np.float32)
    semseg = rng.integers(0, NUM_CLASSES, (H, W))
    return {"rgb": rgb, "depth": depth, "semseg": semseg, "cls": int(rng.integers(0, 3))}


def members(modality: str, sample: dict) -> dict[str, bytes]:
    out = F.encode_sample(modality, sample[modality], num_classes=NUM_CLASSES)
    if modality == "rgb":
        out["cls"] = str(sample["cls"]).encode()
        out["json"] = json.dumps({"source": "test", "orig_size": [H, W]}).encode()
    return out


def key_of(shard: int, i: int) -> str:
    return f"{shard:02d}{i:04d}"


def write_set(root: str, counts=COUNTS, modalities=MODS) -> dict[str, dict]:
    """A shard set written with ShardWriter; returns {key: sample} in stored order."""
    truth = {}
    for s, n in enumerate(counts):
        with ShardWriter(root, F.shard_name(s), modalities) as w:
            for i in range(n):
                key = key_of(s, i)
                truth[key] = make_sample(1000 * s + i)
                w.write(key, {m: members(m, truth[key]) for m in modalities})
    entries = {
        m: F.modality_entry(
            m,
            {"name": "test"},
            meaning="test",
            classes=[f"c{i}" for i in range(NUM_CLASSES)] if m == "semseg" else None,
        )
        for m in modalities
    }
    shards = [{"name": F.shard_name(s), "count": n} for s, n in enumerate(counts)]
    F.update_manifest(root, entries, shards, cls_classes=["a", "b", "c"])
    return truth


def rewrite(root: str, modality: str, shard: int, keys: list[str], truth: dict, extra=None) -> None:
    """Rewrite one modality's shard with the given keys (order matters); `extra` adds members to every sample."""
    with ShardWriter(root, F.shard_name(shard), [modality]) as w:
        for k in keys:
            w.write(k, {modality: {**members(modality, truth[k]), **(extra or {})}})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    return root, write_set(root)


def keys(ds) -> list[str]:
    return [s["__key__"] for s in ds]


def test_roundtrip_is_lossless_where_it_matters(dataset):
    root, truth = dataset
    seen = list(ShardDataset(root, MODS))
    assert [s["__key__"] for s in seen] == list(truth)  # no shuffling: manifest order, stored order
    for s in seen:
        t = truth[s["__key__"]]
        assert s["rgb"].dtype == np.uint8 and s["rgb"].shape == (H, W, 3)
        assert np.abs(s["rgb"].astype(int) - t["rgb"]).mean() < 3.0  # JPEG q95, 4:2:0 chroma, on a smooth image
        stored = Image.open(io.BytesIO(members("rgb", t)["rgb.jpg"])).convert("RGB")
        assert np.array_equal(s["rgb"], np.asarray(stored))  # no loss beyond the JPEG itself
        lo, hi = float(t["depth"].min()), float(t["depth"].max())
        assert s["depth"].dtype == np.float32 and s["depth"].shape == (H, W)
        assert np.abs(s["depth"] - t["depth"]).max() <= (hi - lo) / 65535 * 0.5 + 1e-6
        assert s["semseg"].dtype == np.int64 and np.array_equal(s["semseg"], t["semseg"])
        assert s["cls"] == t["cls"] and isinstance(s["cls"], int)
        assert s["__shard__"] == F.shard_name(int(s["__key__"][:2]))


def test_iter_shard_in_order_and_raw_members(dataset):
    root, truth = dataset
    got = list(iter_shard(root, "shard-000002", ["semseg", "depth"]))
    assert [s["__key__"] for s in got] == [key_of(2, i) for i in range(COUNTS[2])]
    assert all(set(s) == {"__key__", "__shard__", "semseg", "depth"} for s in got)  # cls lives in the rgb tar
    raw = next(iter_shard_members(root, "shard-000001", ["rgb"]))
    assert raw["__key__"] == key_of(1, 0)
    assert raw["rgb"] == members("rgb", truth[key_of(1, 0)])  # exact bytes as written


def test_to_torch_and_transform(dataset):
    root, truth = dataset
    ds = ShardDataset(root, MODS, transform=lambda s: {**to_torch(s), "flipped": np.flip(s["semseg"], 1)})
    s = next(iter(ds))
    assert s["rgb"].dtype == torch.uint8 and tuple(s["rgb"].shape) == (H, W, 3)
    assert s["depth"].dtype == torch.float32 and s["semseg"].dtype == torch.int64
    assert s["cls"].dtype == torch.int64 and int(s["cls"]) == truth[s["__key__"]]["cls"]
    assert np.array_equal(s["flipped"], truth[s["__key__"]]["semseg"][:, ::-1])


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("shuffled", [False, True])
def test_node_and_worker_split_reads_each_sample_once(dataset, world_size, shuffled):
    root, truth = dataset
    got = []
    for rank in range(world_size):
        ds = ShardDataset(
            root,
            ["semseg"],
            rank=rank,
            world_size=world_size,
            shuffle_shards=shuffled,
            shuffle_buffer=5 if shuffled else 0,
            seed=3,
        )
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        got += [s["__key__"] for s in loader]
    assert sorted(got) == sorted(truth) and len(got) == len(truth)


def test_shuffle_is_seeded_and_changes_with_epoch(dataset):
    root, truth = dataset

    def order(seed, epoch):
        ds = ShardDataset(root, ["semseg"], shuffle_shards=True, shuffle_buffer=10, seed=seed)
        ds.set_epoch(epoch)
        return keys(ds)

    first = order(0, 0)
    assert first == order(0, 0) and sorted(first) == sorted(truth)
    assert first != list(truth)
    assert order(0, 1) != first and sorted(order(0, 1)) == sorted(truth)
    assert order(1, 0) != first


def test_resampled_is_infinite_and_seeded(dataset):
    root, truth = dataset

    def draw(seed, epoch=0, rank=0, n=None):
        ds = ShardDataset(root, ["semseg"], resampled=True, seed=seed, rank=rank, world_size=2)
        ds.set_epoch(epoch)
        return [s["__key__"] for s in islice(iter(ds), n or 3 * len(truth))]

    a = draw(0)
    assert len(a) == 3 * len(truth) and set(a) <= set(truth)  # more samples than the set holds: it goes on
    assert a == draw(0) and a != draw(1) and a != draw(0, epoch=1) and a != draw(0, rank=1)
    # each worker draws its own sequence
    ds = ShardDataset(root, ["semseg"], resampled=True, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    got = [s["__key__"] for s in islice(iter(loader), 40)]
    assert got[0::2] != got[1::2]


@pytest.mark.parametrize("case", ["missing key", "swapped order", "extra key at end"])
def test_misaligned_keys_raise_naming_shard_and_keys(tmp_path, case):
    root = str(tmp_path)
    truth = write_set(root, counts=[3, 4])
    ks = [key_of(1, i) for i in range(4)]
    bad = {
        "missing key": ks[:1] + ks[2:],
        "swapped order": [ks[1], ks[0], *ks[2:]],
        "extra key at end": ks + [key_of(0, 0)],
    }[case]
    rewrite(root, "depth", 1, bad, truth)
    with pytest.raises(AlignmentError, match="shard-000001") as e:
        list(ShardDataset(root, MODS, on_error="skip"))  # misalignment is never skipped
    if case != "extra key at end":
        assert repr(ks[0] if case == "swapped order" else ks[1]) in str(e.value)
        assert repr(bad[0] if case == "swapped order" else bad[1]) in str(e.value)
    else:
        assert tar_path(root, "rgb", "shard-000001") in str(e.value) and repr(key_of(0, 0)) in str(e.value)
    with pytest.raises(AlignmentError):
        list(iter_shard(root, "shard-000001", ["rgb", "depth"]))
    assert len(list(iter_shard(root, "shard-000001", ["rgb", "semseg"]))) == 4  # the others stay readable


def test_extra_shard_in_one_modality_raises(tmp_path):
    root = str(tmp_path)
    truth = write_set(root, counts=[3, 4])
    rewrite(root, "depth", 2, [key_of(0, 0)], truth)
    with pytest.raises(AlignmentError, match=r"depth.*shard-000002.*manifest does not list"):
        ShardDataset(root, ["rgb", "depth"])
    assert len(list(ShardDataset(root, ["rgb", "semseg"]))) == 7


def test_missing_or_incomplete_shard_and_bad_arguments(tmp_path):
    root = str(tmp_path)
    write_set(root, counts=[3, 4])
    with pytest.raises(F.FormatError, match=r"no modality \['depth_gt'\]"):
        ShardDataset(root, ["rgb", "depth_gt"])
    with pytest.raises(F.FormatError, match="not in the manifest"):
        ShardDataset(root, ["rgb"], shards=["shard-000009"])
    with pytest.raises(ValueError, match="on_error"):
        ShardDataset(root, ["rgb"], on_error="ignore")
    with pytest.raises(ValueError, match="rank"):
        ShardDataset(root, ["rgb"], rank=1)
    os.remove(stats_path(root, "semseg", "shard-000001"))
    with pytest.raises(F.FormatError, match=r"semseg.*shard-000001.*incomplete"):
        ShardDataset(root, ["rgb", "semseg"])
    assert keys(ShardDataset(root, ["rgb", "semseg"], shards=["shard-000000"])) == [key_of(0, i) for i in range(3)]


def member_offset(path: str, name: str) -> tuple[int, int]:
    with tarfile.open(path) as tf:
        info = tf.getmember(name)
        return info.offset, info.offset_data


def test_truncated_shard_raises_or_is_skipped_and_counted(tmp_path):
    root = str(tmp_path)
    write_set(root, counts=[3, 4, 5])
    path = tar_path(root, "depth", "shard-000001")
    with open(path, "r+b") as f:
        f.truncate(700)  # inside the first member's data
    with pytest.raises(F.FormatError, match=f"{path}: cannot read tar"):
        list(ShardDataset(root, MODS))
    ds = ShardDataset(root, MODS, on_error="skip")
    assert keys(ds) == [key_of(0, i) for i in range(3)] + [key_of(2, i) for i in range(5)]
    assert ds.skipped == {"shards": 1, "samples": 0}


def test_corrupt_member_raises_or_is_skipped_and_counted(tmp_path):
    root = str(tmp_path)
    write_set(root, counts=[3, 4])
    path = tar_path(root, "semseg", "shard-000001")
    _, data = member_offset(path, f"{key_of(1, 2)}.semseg.png")
    with open(path, "r+b") as f:
        f.seek(data + 20)  # inside the PNG header chunk, past the signature
        f.write(b"\xff" * 40)
    with pytest.raises(F.FormatError, match=f"{path}: sample '{key_of(1, 2)}' does not decode"):
        list(ShardDataset(root, MODS))
    ds = ShardDataset(root, MODS, on_error="skip")
    got = keys(ds)
    assert len(got) == 6 and key_of(1, 2) not in got
    assert ds.skipped == {"shards": 0, "samples": 1}
    skipped = {}
    assert len(list(iter_shard(root, "shard-000001", ["semseg"], on_error="skip", skipped=skipped))) == 3
    assert skipped == {"samples": 1}


def test_broken_tar_header_is_not_a_silent_short_read(tmp_path):
    # tarfile stops quietly at a bad header after the first member; the stats count catches it
    root = str(tmp_path)
    write_set(root, counts=[5])
    path = tar_path(root, "rgb", "shard-000000")
    header, _ = member_offset(path, f"{key_of(0, 3)}.cls")
    with open(path, "r+b") as f:
        f.seek(header + 148)  # the header checksum field
        f.write(b"9999999\x00")
    with pytest.raises(F.FormatError, match=r"read 3 samples but .*rgb.*shard-000000.json says 5"):
        list(ShardDataset(root, ["rgb"]))


def test_pickled_members_are_never_unpickled(tmp_path):
    root = str(tmp_path)
    truth = write_set(root, counts=[2])
    marker = str(tmp_path / "unpickled")
    payload = pickle.dumps(_MakesDir(marker))
    rewrite(root, "rgb", 0, list(truth), truth, extra={"pyd": payload, "pickle": payload})
    got = list(ShardDataset(root, MODS)) + list(iter_shard(root, "shard-000000", MODS))
    assert len(got) == 4 and all("pyd" not in s and "pickle" not in s for s in got)
    assert not os.path.exists(marker)
    pickle.loads(payload)  # control: the payload is live
    assert os.path.exists(marker)


class _MakesDir:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_plain_webdataset_and_tar_read_the_shards(dataset):
    root, truth = dataset
    url = os.path.join(root, "rgb", "shard-{000000..000004}.tar")
    plain = list(wds.WebDataset(url, shardshuffle=False))
    assert [s["__key__"] for s in plain] == list(truth)
    assert {k for k in plain[0] if not k.startswith("__")} == {"rgb.jpg", "cls", "json"}
    assert int(plain[0]["cls"]) == truth[plain[0]["__key__"]]["cls"]
    depth = next(iter(wds.WebDataset(os.path.join(root, "depth", "shard-000000.tar"), shardshuffle=False)))
    png = Image.open(io.BytesIO(depth["depth.png"]))
    assert png.mode == "I;16" and png.size == (W, H)
    listing = subprocess.run(
        ["tar", "-tf", tar_path(root, "semseg", "shard-000003")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert listing == [f"{key_of(3, i)}.semseg.png" for i in range(COUNTS[3])]


def test_reads_fsspec_urls():
    root = "memory://reader-test/data"
    truth = write_set(root, counts=[3, 2])
    got = list(ShardDataset(root, MODS))
    assert [s["__key__"] for s in got] == list(truth)
    assert np.array_equal(got[4]["semseg"], truth[key_of(1, 1)]["semseg"])


# --- the tar stage: plain ustar headers parsed by slicing, the rest by tarfile ----------------------


def tar_of(members: list[tuple[str, bytes]], fmt: int, *, mtime: int = 0, kinds: dict | None = None) -> bytes:
    """A tar in `fmt` (tarfile.USTAR_FORMAT / GNU_FORMAT / PAX_FORMAT); `kinds` maps names to other tar types."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime
            if kinds and name in kinds:
                info.type, info.size, info.linkname = kinds[name], 0, "target"
                t.addfile(info)
            else:
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [
    ("k0.cls", b"1"),
    ("k0.rgb.jpg", b"x" * 512),  # exactly one block
    ("k1.cls", b""),
    ("k1.rgb.jpg", b"y" * 1000),
    ("k2." + "s" * 96, b"z"),  # a 99-character name
    ("k3." + "l" * 140, b"long"),  # a GNU long name or a PAX path
    ("k4.cls", b"4"),
    ("caf\u00e9.cls", b"5"),  # not ASCII: a PAX path, or UTF-8 in the header
    ("d/", b""),
    ("k5.link", b""),
    ("k6.cls", b"6"),
]


@pytest.mark.parametrize(
    "fmt, mtime",  # an mtime past the octal field: base-256 (GNU) or a PAX record
    [(tarfile.USTAR_FORMAT, 0), (tarfile.GNU_FORMAT, 0), (tarfile.GNU_FORMAT, 8**11 + 5), (tarfile.PAX_FORMAT, 0),
     (tarfile.PAX_FORMAT, 8**11 + 5)],
)  # fmt: skip
def test_tar_members_are_read_as_tarfile_reads_them(tmp_path, fmt, mtime):
    from shards.tars import iter_members, plain_header

    names = MEMBERS if fmt != tarfile.USTAR_FORMAT else [m for m in MEMBERS if len(m[0]) < 100 and m[0].isascii()]
    data = tar_of(names, fmt, mtime=mtime, kinds={"k5.link": tarfile.SYMTYPE, "d/": tarfile.DIRTYPE})
    path = tmp_path / "t.tar"
    path.write_bytes(data)
    with tarfile.open(path) as t:
        want = [(m.name, m.type, m.size, m.offset_data, t.extractfile(m).read() if m.isreg() else None) for m in t]
    with open(path, "rb") as f:
        got = [(i.name, i.type, i.size, i.offset_data, read() if i.isreg() else None) for i, read in iter_members(
            f, str(path), 2**20)]  # fmt: skip
    assert got == want
    with tarfile.open(path) as t:  # every header the slicing parser accepts, it reads as tarfile does
        for m in t:
            info = plain_header(data[m.offset : m.offset + 512], m.offset)
            if info is not None:
                assert (info.name, info.size, info.offset_data, info.isreg()) == (m.name, m.size, m.offset_data, True)
    if fmt != tarfile.PAX_FORMAT and mtime == 0:  # plain headers: parsed here from start to end
        assert sum(plain_header(data[o : o + 512], o) is not None for o in range(0, len(data), 512)) >= 7


def test_tar_headers_with_a_bad_checksum_or_field_go_to_tarfile(tmp_path):
    from shards.tars import iter_samples, plain_header

    data = bytearray(tar_of([("k0.cls", b"1"), ("k1.cls", b"2"), ("k2.cls", b"3")], tarfile.USTAR_FORMAT))
    assert plain_header(bytes(data[:512]), 0) is not None
    for at, value in ((148, b"0000000\0"), (100, b"00006x4\0"), (124, b"\x80" + bytes(10) + b"\x01")):
        block = bytearray(data[:512])
        block[at : at + len(value)] = value
        assert plain_header(bytes(block), 0) is None
    broken = bytearray(data)
    broken[1024 + 148 : 1024 + 156] = b"7777777\0"  # the second header's checksum
    path = tmp_path / "t.tar"
    path.write_bytes(bytes(broken))
    assert [k for k, _ in iter_samples(str(path))] == ["k0"]  # tarfile ends the tar there, quietly, as before
    path.write_bytes(bytes(data[: 1024 + 512]))  # cut after the second header: its data is missing
    with pytest.raises(F.FormatError, match=r"member 'k1.cls' ends after 0 of 1 bytes"):
        list(iter_samples(str(path)))
    path.write_bytes(bytes(data[:1024]))  # cut after the first member's padding: no end-of-archive blocks
    assert [k for k, _ in iter_samples(str(path))] == ["k0"]
    path.write_bytes(bytes(data[:600]))  # cut inside the first member's padding
    with pytest.raises(F.FormatError, match="cannot read tar .ReadError: unexpected end of data"):
        list(iter_samples(str(path), want=lambda suffix: False))


def _with_field(block: bytes, at: int, value: bytes) -> bytes:
    """A header block with `value` written at `at` and its checksum made right again."""
    block = bytearray(block)
    block[at : at + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@pytest.mark.parametrize(
    "at, value, plain",
    [
        (337, b"0000000 ", True),  # a field ended by a space, not a NUL
        (100, b"   644 \0", True),  # spaces around the digits (old tars)
        (136, b"00000000000\0", True),
        (157, b"\xff" * 100, True),  # the largest bytes (linkname, uname, gname): the checksum's exact sum
        (265, b"\xff" * 64, True),
        (108, b"0001750 ", False),  # space-ended, next to a field of digits: tarfile decides (and reads it)
        (100, b"00 0644\0", False),  # a space between digits: tarfile refuses the header
        (100, b"0o00644\0", False),  # what int() would read, tarfile too: tarfile decides
        (124, b"0000000001\t\0", False),
    ],
)
def test_plain_headers_read_as_tarfile_reads_them(tmp_path, at, value, plain):
    from shards.tars import iter_members, plain_header

    data = tar_of([("k0.cls", b"1"), ("k1.cls", b"2"), ("k2.cls", b"3")], tarfile.USTAR_FORMAT)
    data = data[:1024] + _with_field(data[1024:1536], at, value) + data[1536:]  # the second header
    assert (plain_header(data[1024:1536], 1024) is not None) is plain
    path = tmp_path / "t.tar"
    path.write_bytes(data)
    with tarfile.open(path) as t:
        want = [(m.name, m.size, m.offset_data, t.extractfile(m).read()) for m in t]
    with open(path, "rb") as f:
        got = [(i.name, i.size, i.offset_data, read()) for i, read in iter_members(f, str(path), 2**20)]
    assert got == want
    assert len(got) == (3 if value != b"00 0644\0" else 1)


def test_a_stream_is_read_by_tarfile_with_the_same_members():
    from shards.tars import iter_members

    data = tar_of(MEMBERS[:5], tarfile.GNU_FORMAT)

    class Stream(io.RawIOBase):  # not seekable: a pipe or an HTTP body
        def __init__(self):
            self.f = io.BytesIO(data)

        def readable(self):
            return True

        def readinto(self, b):
            chunk = self.f.read(len(b))
            b[: len(chunk)] = chunk
            return len(chunk)

    with io.BufferedReader(Stream()) as f:
        got = [(i.name, read()) for i, read in iter_members(f, "stream", 2**20)]
    assert got == list(MEMBERS[:5])
