"""Hostile and broken data never hurts (docs/trust-model.md), shard side: safe decoding, bounded reads, validated
names, verify on broken tars, member digests, the folder source, errors that name the file.

Every input is built at test time (tests/hostile_corpus.py); sparse bombs are a few KB on disk. Children that
could allocate run with a capped data segment, so a regression fails the test instead of the machine.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hostile_corpus import (
    CLI,
    POSTSCRIPT,
    GiB,
    edit_stats,
    fake_ghostscript,
    image,
    key_of,
    member,
    members_of,
    replace_tar,
    rgb_set,
    run_bounded,
    sparse_gnu,
    sparse_pax,
    tar_bytes,
)
from PIL import EpsImagePlugin, Image

from shards import format as F
from shards.build import BuildError, build
from shards.cli import main
from shards.images import LABEL_FORMATS, RGB_FORMATS, SOURCE_FORMATS
from shards.reader import AlignmentError, ShardDataset
from shards.sources import SourceError, open_source
from shards.tars import MemberError
from shards.verify import verify
from shards.writer import ShardWriter, stats_path, tar_path

PY = str(Path(CLI).with_name("python"))
S0 = "shard-000000"
READ_ALL = (
    "import sys; from shards.reader import iter_shard; print(len(list(iter_shard(sys.argv[1], sys.argv[2], ['rgb']))))"
)


def jpeg_bytes(seed: int, h: int = 16, w: int = 16) -> bytes:
    return F.encode_rgb(image(seed, h, w))


def lines_of(problems) -> list[str]:
    return [str(p) for p in problems]


def swap(items: list, name: str, new) -> list:
    """The member list with the member called `name` replaced by `new` (a (TarInfo, data) pair or raw bytes)."""
    assert any(i.name == name for i, _ in items), name
    return [new if info.name == name else (info, data) for info, data in items]


def cli(*args: str) -> tuple[int, str, str]:
    res = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=300)
    return res.returncode, res.stdout, res.stderr


# --- one safe decode path -------------------------------------------------------------------------


def test_allow_lists_name_in_process_plugins_only():
    Image.init()
    for formats in (SOURCE_FORMATS, RGB_FORMATS, LABEL_FORMATS):
        assert set(formats) <= set(Image.OPEN) and "EPS" not in formats
    assert RGB_FORMATS == ("JPEG", "PNG", "WEBP") and LABEL_FORMATS == ("PNG",)
    png = F.encode_semseg(np.zeros((4, 4), int), 3)
    assert F.decode_semseg(png).shape == (4, 4)
    with pytest.raises(F.FormatError, match="not an image: none of the accepted formats PNG"):
        F.decode_semseg(jpeg_bytes(0))  # a JPEG where a label PNG belongs
    gif = Image.fromarray(image(1)).convert("P")
    buf = __import__("io").BytesIO()
    gif.save(buf, "GIF")
    with pytest.raises(F.FormatError, match="none of the accepted formats JPEG, PNG, WEBP"):
        F.decode_rgb(buf.getvalue())  # GIF: a source format, never a shard member


@pytest.fixture
def ghostscript(tmp_path, monkeypatch) -> Path:
    """A fake `gs` first on PATH that leaves a marker when run; Pillow's cached lookup is reset."""
    env, marker = fake_ghostscript(tmp_path / "gsbin")
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


def test_postscript_named_jpg_is_never_rendered_by_a_build(tmp_path, ghostscript):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "good.jpg").write_bytes(jpeg_bytes(0, 32, 32))
    (src / "evil.jpg").write_bytes(POSTSCRIPT)
    summary = build(open_source("folder", str(src)), str(tmp_path / "out"), progress=False)
    assert (summary.samples, dict(summary.skipped)) == (1, {"not an image": 1})
    tars = tmp_path / "tars"
    tars.mkdir()
    with wds.TarWriter(str(tars / "part.tar")) as w:
        w.write({"__key__": "good", "jpg": jpeg_bytes(1, 32, 32)})
        w.write({"__key__": "evil", "jpg": POSTSCRIPT})
    summary = build(open_source("webdataset", str(tars)), str(tmp_path / "out2"), progress=False)
    assert (summary.samples, dict(summary.skipped)) == (1, {"not an image": 1})
    assert not ghostscript.exists(), ghostscript.read_text()


def test_postscript_member_is_never_rendered_by_reader_or_verify(tmp_path, ghostscript):
    root = str(tmp_path)
    rgb_set(root, [3])
    k = key_of(0, 1)
    with ShardWriter(root, S0, ["rgb"]) as w:  # a consistent shard (stats, digests) whose rgb member is EPS
        for i in range(3):
            w.write(key_of(0, i), {"rgb": {"rgb.jpg": POSTSCRIPT if i == 1 else jpeg_bytes(i)}})
    with pytest.raises(F.FormatError, match=f"sample '{k}' does not decode.*not an image"):
        list(ShardDataset(root, ["rgb"]))
    (problem,) = verify(root)
    assert (problem.key, problem.file) == (k, tar_path(root, "rgb", S0)) and "not an image" in problem.what
    assert not ghostscript.exists(), ghostscript.read_text()


def test_pixel_limit_applies_to_every_shard_decode(tmp_path, monkeypatch):
    depth, rng = F.encode_depth(np.ones((64, 64), np.float32))
    monkeypatch.setenv("MULTIMAE_MAX_PIXELS", "1000")
    with pytest.raises(F.FormatError, match=r"too large: 64x64 px \(limit 1000 px\)"):
        F.decode_depth(depth, rng)
    with pytest.raises(F.FormatError, match="too large: 64x64"):
        F.decode_rgb(jpeg_bytes(0, 64, 64))
    monkeypatch.setenv("MULTIMAE_MAX_PIXELS", "lots")
    with pytest.raises(F.FormatError, match="MULTIMAE_MAX_PIXELS='lots' must be a positive integer"):
        F.decode_rgb(jpeg_bytes(0))


# --- bounded reads --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, size", [("gnu", GiB), ("pax", 10 * GiB)])
def test_sparse_member_bomb_is_refused_by_its_header_in_bounded_memory(tmp_path, kind, size):
    root = str(tmp_path / "data")
    rgb_set(root, [3])
    name = f"{key_of(0, 1)}.rgb.jpg"
    bomb = (sparse_gnu if kind == "gnu" else sparse_pax)(name, size)
    path = replace_tar(root, 0, swap(members_of(tar_path(root, "rgb", S0)), name, bomb))
    assert os.path.getsize(path) < 16_000
    expected = f"member '{name}': is a sparse member that expands to {size} bytes: only plain members are read"

    code, out, err, rss = run_bounded([CLI, "verify", root])
    assert code == 1 and "Traceback" not in err, err[-2000:]
    assert f"{path}: {key_of(0, 1)}: {expected}" in out.splitlines()
    assert rss < 1.5 * GiB, rss

    code, out, err, rss = run_bounded([PY, "-c", READ_ALL, root, S0])
    assert code == 1 and err.strip().splitlines()[-1].endswith(f"{path}: {expected}")
    assert rss < 1.5 * GiB, rss


def test_compressed_tar_is_refused_not_inflated(tmp_path):
    root = str(tmp_path / "data")
    rgb_set(root, [3])
    path = tar_path(root, "rgb", S0)
    Path(path).write_bytes(gzip.compress(Path(path).read_bytes()))  # still named .tar
    message = f"{path}: is a gzip-compressed file, not a plain tar"
    with pytest.raises(F.FormatError, match=message):
        list(ShardDataset(root, ["rgb"]))
    assert any(message in p.what for p in verify(root))
    with pytest.raises(SourceError, match="is a gzip-compressed file"):
        open_source("webdataset", path)


def test_member_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    root = str(tmp_path / "data")
    rgb_set(root, [2])
    src = tmp_path / "photos"
    src.mkdir()
    (src / "big.jpg").write_bytes(jpeg_bytes(0, 64, 64))
    size = len(jpeg_bytes(0))  # the rgb member of sample 0; every JPEG here is over 100 bytes
    monkeypatch.setenv("MULTIMAE_MAX_MEMBER_BYTES", "100")
    name = f"{key_of(0, 0)}.rgb.jpg"
    with pytest.raises(MemberError, match=f"member '{name}': is {size} bytes, over the 100-byte member limit"):
        list(ShardDataset(root, ["rgb"]))
    assert sum("over the" in p.what for p in verify(root)) == 2
    summary = build(open_source("folder", str(src)), str(tmp_path / "out"), progress=False)
    assert dict(summary.skipped) == {"too large": 1}
    monkeypatch.setenv("MULTIMAE_MAX_MEMBER_BYTES", "-5")
    with pytest.raises(F.FormatError, match="MULTIMAE_MAX_MEMBER_BYTES='-5' must be a positive integer"):
        list(ShardDataset(root, ["rgb"]))


NON_REGULAR = [
    dict(type=tarfile.SYMTYPE, linkname="/etc/passwd"),
    dict(type=tarfile.LNKTYPE, linkname="000000.cls"),
    dict(type=tarfile.FIFOTYPE),
    dict(type=tarfile.CHRTYPE, devmajor=1, devminor=5),
]


def test_non_regular_members_are_refused_by_verify_and_skipped_by_sources(tmp_path):
    root = str(tmp_path / "data")
    rgb_set(root, [5])
    items = members_of(tar_path(root, "rgb", S0))
    for i, fields in enumerate(NON_REGULAR, start=1):
        items = swap(items, f"{key_of(0, i)}.rgb.jpg", member(f"{key_of(0, i)}.rgb.jpg", **fields))
    replace_tar(root, 0, items)
    problems = [p for p in verify(root) if "regular file" in p.what]
    assert [(p.key, p.what) for p in problems] == [
        (key_of(0, i), f"member '{key_of(0, i)}.rgb.jpg': is {kind}, not a regular file: only regular files are read")
        for i, kind in enumerate(["a symbolic link to '/etc/passwd'", "a hard link to '000000.cls'", "a FIFO",
                                  "a character device"], start=1)
    ]  # fmt: skip
    with pytest.raises(MemberError, match="is a symbolic link to '/etc/passwd', not a regular file"):
        list(ShardDataset(root, ["rgb"]))
    tars = tmp_path / "tars"
    tars.mkdir()
    Path(tars / "part.tar").write_bytes(
        tar_bytes([member("a.jpg", jpeg_bytes(0)), member("b.jpg", type=tarfile.SYMTYPE, linkname="/dev/zero")])
    )
    summary = build(open_source("webdataset", str(tars)), str(tmp_path / "out"), progress=False)
    assert (summary.samples, dict(summary.skipped)) == (1, {"refused member": 1})
    stats = json.loads((tmp_path / "out" / "rgb" / f"{S0}.json").read_text())
    assert stats["skipped"] == [
        {"ref": "part.tar:b", "reason": "refused member: b.jpg is a symbolic link to '/dev/zero', not a regular "
         "file: only regular files are read"}
    ]  # fmt: skip


# --- names from manifests and stats ---------------------------------------------------------------


def test_manifest_names_outside_the_set_are_refused(tmp_path):
    victim = tmp_path / "attacker" / "victim"  # what data/rgb/../../victim resolves to
    rgb_set(victim, [2])
    attacker = str(tmp_path / "attacker" / "data")
    rgb_set(attacker, [2])
    path = os.path.join(attacker, "manifest.json")
    manifest = json.loads(Path(path).read_text())
    for bad_name in ("../../victim/rgb/shard-000000", "/etc/shard-000000", "shard-1"):
        manifest["shards"][0]["name"] = bad_name
        Path(path).write_text(json.dumps(manifest))
        with pytest.raises(F.FormatError) as err:
            ShardDataset(attacker, ["rgb"])
        assert str(err.value) == f"{path}: invalid shard name {bad_name!r}: shard names are 'shard-' and 6+ digits"
        (problem,) = verify(attacker)
        assert problem.file == path and bad_name in problem.what
    manifest["shards"][0]["name"] = S0
    manifest["modalities"]["depth_/../../victim/rgb"] = manifest["modalities"]["rgb"]
    Path(path).write_text(json.dumps(manifest))
    with pytest.raises(F.FormatError, match=r"unknown modality 'depth_/\.\./\.\./victim/rgb'"):
        F.read_manifest(attacker)


def test_stats_fields_are_validated(tmp_path):
    root = str(tmp_path)
    rgb_set(root, [2])

    def sha256_field(stats: dict) -> None:  # the field of earlier versions, with a digest cut short
        stats["member_sha256"] = {"000000.cls": "0" * 40}
        del stats["member_blake3"]

    cases = {
        "count": (lambda s: s.update(count="2"), "count '2' is not a non-negative integer"),
        "shard": (lambda s: s.update(shard="shard-000009"), "shard is 'shard-000009', not 'shard-000000'"),
        "digest key": (
            lambda s: s["member_blake3"].update({"../x.rgb.jpg": "0" * 64}),
            "member_blake3: member '../x.rgb.jpg': invalid sample key ''",
        ),
        "digest hex": (
            lambda s: s["member_blake3"].update({"000000.cls": "0" * 63 + "g"}),
            f"member_blake3: member '000000.cls' has digest '{'0' * 63}g', not a blake3 hex digest",
        ),
        "old digest hex": (
            sha256_field,
            f"member_sha256: member '000000.cls' has digest '{'0' * 40}', not a sha256 hex digest",
        ),
        "both digest fields": (
            lambda s: s.update(member_sha256=dict(s["member_blake3"])),
            "has both member_blake3 and member_sha256: a stats json records its member digests in one of them",
        ),
        "skipped": (lambda s: s.update(skipped=[{"ref": 1}]), "skipped must be a list of"),
    }
    for change, message in cases.values():
        backup = Path(stats_path(root, "rgb", S0)).read_bytes()
        edit_stats(root, 0, change)
        with pytest.raises(F.FormatError, match=None) as err:
            list(ShardDataset(root, ["rgb"]))
        assert str(err.value).startswith(f"{stats_path(root, 'rgb', S0)}: {message}"), str(err.value)
        (problem,) = verify(root)
        assert problem.file == stats_path(root, "rgb", S0) and message in problem.what
        Path(stats_path(root, "rgb", S0)).write_bytes(backup)


# --- verify never crashes -------------------------------------------------------------------------


def _broken(root: str, case: str) -> None:
    """Damage shard 0 of the rgb-only set at `root` in the way `case` names."""
    path = tar_path(root, "rgb", S0)
    items = members_of(path)
    k = [key_of(0, i) for i in range(4)]
    if case == "members not adjacent":  # 0.cls 1.cls 0.rgb.jpg ...
        items[1], items[2] = items[2], items[1]
    elif case == "key repeated after the last sample":
        items.append(member(f"{k[0]}.json", b"{}"))
    elif case == "non-UTF-8 key":
        items = swap(items, f"{k[1]}.cls", member("\udcff\udcfe.cls", b"1"))
    elif case == "key in a directory":
        items = swap(items, f"{k[1]}.cls", member(f"a/{k[1]}.cls", b"1"))
    elif case == "name without suffix":
        items.append(member("README", b"hi"))
    elif case == "member twice":
        items.insert(1, member(f"{k[0]}.cls", b"1"))
    elif case == "newline in a name":
        items = swap(items, f"{k[1]}.cls", member(f"{k[1]}.cls\nfake: line", b"1"))
    elif case == "sparse member":
        items = swap(items, f"{k[1]}.rgb.jpg", sparse_gnu(f"{k[1]}.rgb.jpg", 10 * GiB))
    elif case == "symbolic link":
        items = swap(items, f"{k[1]}.rgb.jpg", member(f"{k[1]}.rgb.jpg", type=tarfile.SYMTYPE, linkname="/x"))
    elif case == "postscript member":
        items = swap(items, f"{k[1]}.rgb.jpg", member(f"{k[1]}.rgb.jpg", POSTSCRIPT))
    elif case == "cut at a member boundary":
        items = items[:4]
    if case not in ("gzip file", "empty file", "garbage", "cut inside a member", "fifo tar", "bad stats json"):
        Path(path).write_bytes(tar_bytes(items))
    elif case == "gzip file":
        Path(path).write_bytes(gzip.compress(Path(path).read_bytes()))
    elif case == "empty file":
        Path(path).write_bytes(b"")
    elif case == "garbage":
        Path(path).write_bytes(np.random.default_rng(0).bytes(3000))
    elif case == "cut inside a member":
        Path(path).write_bytes(Path(path).read_bytes()[:2000])  # inside the first rgb.jpg's data
    elif case == "fifo tar":
        os.remove(path)
        os.mkfifo(path)
    elif case == "bad stats json":
        Path(stats_path(root, "rgb", S0)).write_text('{"count": 4,')


BROKEN = {  # case -> what the first problem line of that shard says
    "members not adjacent": "its key came earlier in the tar",
    "key repeated after the last sample": "its key came earlier in the tar",
    "non-UTF-8 key": r"member '\udcff\udcfe.cls': is not named <key>.<suffix>",
    "key in a directory": "member 'a/000001.cls': is not named <key>.<suffix>",
    "name without suffix": "member 'README': is not named <key>.<suffix>",
    "member twice": "appears twice in its sample",
    "newline in a name": r"member '000001.cls\nfake: line': is not named",
    "sparse member": "is a sparse member that expands to 10737418240 bytes",
    "symbolic link": "is a symbolic link to '/x', not a regular file",
    "postscript member": "rgb does not decode",
    "cut at a member boundary": "holds 2 samples but its stats json says 4",
    "gzip file": "is a gzip-compressed file, not a plain tar",
    "empty file": "tar unreadable after 0 samples",
    "garbage": "tar unreadable after 0 samples",
    "cut inside a member": "tar unreadable after",
    "fifo tar": "is a FIFO, not a regular file",
    "bad stats json": "stats json unreadable (not valid JSON",
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_verify_reports_each_broken_tar_in_lines(tmp_path, case):
    root = str(tmp_path)
    rgb_set(root, [4])
    _broken(root, case)
    problems = verify(root)
    text = lines_of(problems)
    assert problems and all("\n" not in line and line.isprintable() for line in text), text
    assert any(BROKEN[case] in line for line in text), text


@pytest.mark.timeout(400)
def test_verify_cli_on_a_set_of_broken_tars_exits_1_with_one_line_per_problem(tmp_path):
    """One shard per kind of damage; `multimae-shard verify` lists each, never a traceback."""
    cases = sorted(BROKEN)
    parts = []
    for i, case in enumerate(cases):  # build each broken shard alone, then gather them as shards 1..n
        part = tmp_path / f"part{i}"
        rgb_set(part, [4])
        _broken(str(part), case)
        parts.append(part)
    root = tmp_path / "data"
    rgb_set(root, [4] * (len(cases) + 1))
    for i, (part, case) in enumerate(zip(parts, cases), start=1):
        name = F.shard_name(i)
        for ext in ("tar", "json"):
            src, dst = part / "rgb" / f"{S0}.{ext}", root / "rgb" / f"{name}.{ext}"
            dst.unlink()
            if src.is_fifo():
                os.mkfifo(dst)
            elif ext == "json" and case != "bad stats json":
                dst.write_text(json.dumps({**json.loads(src.read_text()), "shard": name}))
            else:
                shutil.copyfile(src, dst)
    code, out, err, _ = run_bounded([CLI, "verify", str(root)], timeout=300)
    assert code == 1 and "Traceback" not in err, err
    lines = out.splitlines()
    assert all(line.startswith(f"{root}/") and line.isprintable() for line in lines), lines
    for i, case in enumerate(cases, start=1):
        mine = [line for line in lines if f"/{F.shard_name(i)}." in line]
        assert any(BROKEN[case] in line for line in mine), (case, mine)
    assert not any(f"/{S0}." in line for line in lines)  # the intact shard has no problem
    assert err.strip().splitlines()[-1] == f"verify: {len(lines)} problem(s) in {root}"


# --- member digests -------------------------------------------------------------------------------


def _patch(path: str, name: str, change) -> None:
    """Rewrite the bytes of one member in place (same length, so the tar stays valid)."""
    with tarfile.open(path) as t:
        info = t.getmember(name)
        data = t.extractfile(info).read()
    new = change(data)
    assert len(new) == len(data) and new != data
    with open(path, "r+b") as f:
        f.seek(info.offset_data)
        f.write(new)


def test_flipped_scan_byte_and_edited_depth_range_are_detected(tmp_path):
    root = str(tmp_path)
    rgb_set(root, [4], depth=True)
    k1, k2 = key_of(0, 1), key_of(0, 2)

    def flip(data: bytes) -> bytes:  # one bit in the entropy-coded scan data: still a decodable JPEG
        at = data.index(b"\xff\xda") + 20
        return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]

    _patch(tar_path(root, "rgb", S0), f"{k1}.rgb.jpg", flip)
    _patch(tar_path(root, "depth", S0), f"{k2}.depth.json", lambda d: d.replace(b"[\n  1.0", b"[\n  0.5"))
    with tarfile.open(tar_path(root, "rgb", S0)) as t:
        flipped = F.decode_rgb(t.extractfile(f"{k1}.rgb.jpg").read())
    assert flipped.shape == (16, 16, 3) and not np.array_equal(flipped, F.decode_rgb(jpeg_bytes(1)))
    assert verify(root) == []  # both still decode to plausible values: only the digests tell

    with pytest.raises(F.FormatError, match=f"sample '{k1}' does not decode: member {k1}.rgb.jpg differs"):
        list(ShardDataset(root, ["rgb", "depth"]))
    ds = ShardDataset(root, ["rgb", "depth"], on_error="skip")
    assert [s["__key__"] for s in ds] == [key_of(0, 0), key_of(0, 3)] and ds.skipped == {"shards": 0, "samples": 2}
    assert len(list(ShardDataset(root, ["rgb", "depth"], verify_digests=False))) == 4
    deep = verify(root, deep=True)
    assert [(p.file, p.key) for p in deep] == [(tar_path(root, "depth", S0), k2), (tar_path(root, "rgb", S0), k1)]
    assert deep[0].what == f"member {k2}.depth.json differs from its blake3 in the stats json: its bytes are damaged"


def _sha256_stats(root: str, shard: int, modality: str) -> None:
    """Rewrite a fresh stats json as earlier versions wrote it: SHA-256 digests of every member, `member_sha256`."""
    with tarfile.open(tar_path(root, modality, F.shard_name(shard))) as t:
        digests = {m.name: hashlib.sha256(t.extractfile(m).read()).hexdigest() for m in t}

    def rewrite(stats: dict) -> None:
        assert set(stats.pop("member_blake3")) == set(digests)
        stats["member_sha256"] = digests

    edit_stats(root, shard, rewrite, modality)


def test_sets_with_sha256_digests_read_and_catch_a_flipped_byte(tmp_path):
    root = str(tmp_path)
    rgb_set(root, [4, 2], depth=True)
    for s in (0, 1):
        for m in ("rgb", "depth"):
            _sha256_stats(root, s, m)
    assert len(list(ShardDataset(root, ["rgb", "depth"]))) == 6
    assert verify(root, deep=True) == []
    assert cli("verify", "--deep", root) == (0, f"verify: {root} is complete and consistent\n", "")

    k1 = key_of(0, 1)
    _patch(tar_path(root, "rgb", S0), f"{k1}.cls", lambda d: bytes([d[0] ^ 1]) + d[1:])
    with pytest.raises(F.FormatError, match=f"sample '{k1}' does not decode: member {k1}.cls differs from its sha256"):
        list(ShardDataset(root, ["rgb", "depth"]))
    (problem,) = verify(root, deep=True)
    assert (problem.file, problem.key) == (tar_path(root, "rgb", S0), k1)
    assert problem.what == f"member {k1}.cls differs from its sha256 in the stats json: its bytes are damaged"


def test_old_sets_without_digests_read_and_verify_with_the_check_unavailable(tmp_path):
    root = str(tmp_path)
    rgb_set(root, [3, 2])
    for s in (0, 1):
        edit_stats(root, s, lambda st: st.pop("member_blake3", None))
    assert len(list(ShardDataset(root, ["rgb"]))) == 5
    assert verify(root, deep=True) == []
    code, out, err = cli("verify", "--deep", root)
    assert (code, out) == (0, f"verify: {root} is complete and consistent\n")
    assert err.startswith("verify: member digest check unavailable for 2 shard file(s)")


# --- the folder source ----------------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_folder_source_reads_regular_files_only(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.jpg").write_bytes(jpeg_bytes(0, 32, 32))
    (src / "link-to-a.jpg").symlink_to(src / "a.jpg")  # a link to a regular file is read
    os.mkfifo(src / "pipe.jpg")  # would block the open forever
    (src / "zero.jpg").symlink_to("/dev/zero")  # would never end
    out = tmp_path / "out"
    args = [CLI, "build", "--src", "folder", "--root", str(src), "--out", str(out), "--workers", "1", "--no-progress"]
    code, stdout, err, rss = run_bounded(args, timeout=300)
    assert code == 0, err[-2000:]
    assert "wrote 2 samples in 1 shards" in stdout and "skipped 2 (not a regular file: 2)" in stdout
    skipped = {s["ref"]: s["reason"] for s in json.loads((out / "rgb" / f"{S0}.json").read_text())["skipped"]}
    assert skipped == {"pipe.jpg": "not a regular file: a FIFO", "zero.jpg": "not a regular file: a character device"}


# --- errors that name the file --------------------------------------------------------------------


def test_damaged_json_names_the_file_in_reader_workers_info_and_resume(tmp_path, capsys):
    root = str(tmp_path / "data")
    rgb_set(root, [2, 2])
    stats = stats_path(root, "rgb", "shard-000001")
    Path(stats).write_text('{"count": 2, "keys_digest": ')
    message = f"{stats}: not valid JSON (Expecting value: line 1 column 29"
    with pytest.raises(F.FormatError) as err:
        list(ShardDataset(root, ["rgb"]))
    assert str(err.value).startswith(message)
    loader = torch.utils.data.DataLoader(ShardDataset(root, ["rgb"], shards=["shard-000001"]), num_workers=1)
    with pytest.raises(F.FormatError) as err:  # raised in the worker, re-created in this process
        list(loader)
    assert message in str(err.value)
    with pytest.raises(SystemExit) as code:
        main(["info", root])
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.startswith(f"multimae-shard info: error: {message}") and err.count("\n") == 1
    assert err.endswith("the file is damaged; restore or rebuild it\n")

    out = str(tmp_path / "built")
    build(open_source("synthetic", num=4, size=32), out, shard_size=2, progress=False)
    Path(stats_path(out, "depth_gt", S0)).write_text("[")
    with pytest.raises(F.FormatError, match=f"{stats_path(out, 'depth_gt', S0)}: not valid JSON"):
        build(open_source("synthetic", num=4, size=32), out, shard_size=2, progress=False)
    Path(out, "manifest.json").write_text("{oops")
    with pytest.raises(SystemExit) as code:
        main(["info", out])
    assert code.value.code == 2
    assert capsys.readouterr().err.startswith(f"multimae-shard info: error: {out}/manifest.json: not valid JSON")


def test_format_errors_survive_worker_and_actor_boundaries():
    from shards.fs import NotRegularFile

    for cls in (F.FormatError, AlignmentError, MemberError, SourceError, BuildError, NotRegularFile):
        err = cls("/data/rgb/shard-000000.tar: what went wrong")
        again = type(err)(str(err))  # how a DataLoader worker's error is re-created in the main process
        back = pickle.loads(pickle.dumps(err))  # how Ray hands an actor's error to the driver
        assert type(again) is type(back) is cls and str(again) == str(back) == str(err)
    err = pickle.loads(pickle.dumps(MemberError("t.tar: member 'k.x': bad", member="k.x", key="k")))
    assert (err.member, err.key, str(err)) == ("k.x", "k", "t.tar: member 'k.x': bad")


def test_disk_full_names_the_path_being_written(tmp_path):
    """A 32 KiB tmpfs in a private mount namespace (unshare) stands in for a full disk."""
    probe = subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("needs `unshare -r -m` (user and mount namespaces) to make a small disk")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = 'mount -t tmpfs -o size=32k tmpfs "$0" && exec "$@"'
    args = ["build", "--src", "synthetic", "--num", "8", "--size", "64", "--shard-size", "8", "--workers", "1"]
    res = subprocess.run(
        ["unshare", "-r", "-m", "sh", "-c", script, str(disk), CLI, *args, "--no-progress", "--out", f"{disk}/out"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.splitlines()
    prefix = "multimae-shard build: error: [Errno 28] No space left on device while writing; free space there or write"
    assert re.fullmatch(rf"{re.escape(prefix)} elsewhere: '{re.escape(str(disk))}/out/[a-z_]+/{S0}\.(tar|json)'", line)
