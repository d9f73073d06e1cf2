"""Source transform of the CUDA emulation: copies csrc/cuda/*.cu and *.cuh into a build
directory, rewriting only what C++ cannot express through a header (see README.md):

1. kernel launches ``NAME<<<grid, block[, smem[, stream]]>>>(args...)`` become
   ``::cuda_emu::launch("NAME", __FILE__, __LINE__, dim3(grid), dim3(block), smem, stream,
   [&](auto&&... cuda_emu_a) { NAME(cuda_emu_a...); }, args...)``
   (NAME may be a template-id such as ``kernel<scalar_t, KP, kCL, true>``);
2. ``extern __shared__ [__align__(n)] T name[];`` becomes
   ``T* const name = ::cuda_emu::dynamic_smem<T>();`` (a block-scope extern array cannot be
   bound to per-launch storage by a macro).

Everything else is copied verbatim; a ``#line 1 "<original path>"`` directive and line-count
preserving rewrites keep compiler diagnostics pointing at the original file and line. The
shim headers <cuda_runtime.h>, <cuda_runtime_api.h>, <cuda_fp16.h> and <cuda_bf16.h>
written into ``<build>/shim`` redirect those includes to cuda_emu.h.

Usage: python transform.py SRC_DIR OUT_DIR   (prints the transformed .cu paths)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EMU_HEADER = HERE / "cuda_emu.h"
SHIM_HEADERS = ("cuda_runtime.h", "cuda_runtime_api.h", "cuda_fp16.h", "cuda_bf16.h")

_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?"
    r"(?P<type>[A-Za-z_][\w\s:<>,*]*?)\s+(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*;"
)

_OPEN = "([{"
_CLOSE = ")]}"


class TransformError(ValueError):
    pass


def _skip_literal_or_comment(text: str, i: int) -> int:
    """If text[i] starts a string/char literal or a comment, the index past it, else i."""
    c = text[i]
    if c in "\"'":
        j = i + 1
        while j < len(text) and text[j] != c:
            j += 2 if text[j] == "\\" else 1
        return j + 1
    if text.startswith("//", i):
        j = text.find("\n", i)
        return len(text) if j < 0 else j
    if text.startswith("/*", i):
        j = text.find("*/", i + 2)
        return len(text) if j < 0 else j + 2
    return i


def _walk(text: str, i: int):
    """From text[i] on, yields (j, k, depth, code) for each piece text[j:k]: a literal or a
    comment (code False), or one character of code with the bracket depth after it."""
    depth = 0
    j = i
    while j < len(text):
        k = _skip_literal_or_comment(text, j)
        code = k == j
        if code:
            k = j + 1
            if text[j] in _OPEN:
                depth += 1
            elif text[j] in _CLOSE:
                depth -= 1
        yield j, k, depth, code
        j = k


def _scan(text: str, i: int, launch: bool) -> int:
    """Index of the bracket closing the one at text[i] ( ( [ { ), or with ``launch`` of the
    `>>>` closing a launch configuration that starts at i (after `<<<`); skips literals."""
    for j, _, depth, code in _walk(text, i):
        if not code or depth != 0:
            continue
        if not launch and text[j] in _CLOSE:
            return j
        if launch and text.startswith(">>>", j):
            return j
    what = "launch configuration" if launch else "bracket"
    raise TransformError(f"unbalanced {what} at offset {i}")


def _find_matching(text: str, i: int) -> int:
    return _scan(text, i, launch=False)


def _find_launch_close(text: str, i: int) -> int:
    return _scan(text, i, launch=True)


def _kernel_name_start(text: str, end: int) -> int:
    """Start of the kernel expression ending just before `end` (the `<<<`): an identifier,
    possibly qualified (a::b), possibly followed by a template argument list."""
    j = end
    while j > 0 and text[j - 1].isspace():
        j -= 1
    if j > 0 and text[j - 1] == ">":  # template-id: walk back over the balanced <...>
        depth = 0
        while j > 0:
            j -= 1
            c = text[j]
            if c == ">":
                depth += 1
            elif c == "<":
                depth -= 1
                if depth == 0:
                    break
            elif c in ")]}":
                j = _find_matching_back(text, j)
        while j > 0 and text[j - 1].isspace():
            j -= 1
    while j > 0 and (text[j - 1].isalnum() or text[j - 1] in "_:"):
        j -= 1
    return j


def _find_matching_back(text: str, i: int) -> int:
    pairs = {")": "(", "]": "[", "}": "{"}
    depth = 0
    for j in range(i, -1, -1):
        if text[j] in pairs:
            depth += 1
        elif text[j] in pairs.values():
            depth -= 1
            if depth == 0:
                return j
    raise TransformError(f"unbalanced bracket before offset {i}")


def _split_top_level(s: str) -> list[str]:
    """Splits the launch configuration at commas outside (), [], {} and outside template
    argument lists (pieces with unbalanced < > are merged back)."""
    parts, cur = [], []
    for j, k, depth, code in _walk(s, 0):
        if code and s[j] == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(s[j:k])
    parts.append("".join(cur))
    merged: list[str] = []
    for p in parts:
        if merged and merged[-1].count("<") > merged[-1].count(">"):
            merged[-1] += "," + p
        else:
            merged.append(p)
    return merged


def rewrite_launches(text: str) -> tuple[str, int]:
    """Rewrites every `<<<...>>>(...)` launch; returns (text, number of launches)."""
    out: list[str] = []
    pos = 0
    count = 0
    i = 0
    while True:
        # next `<<<` outside literals and comments
        while i < len(text):
            k = _skip_literal_or_comment(text, i)
            if k != i:
                i = k
                continue
            if text.startswith("<<<", i):
                break
            i += 1
        if i >= len(text):
            break
        start = _kernel_name_start(text, i)
        name = text[start:i]
        if start < pos or not name.strip():
            raise TransformError(f"cannot find the kernel of the launch at offset {i}")
        cfg_end = _find_launch_close(text, i + 3)
        cfg = _split_top_level(text[i + 3:cfg_end])
        if not 2 <= len(cfg) <= 4:
            raise TransformError(f"launch configuration needs 2 to 4 parts: {text[i:cfg_end + 3]!r}")
        j = cfg_end + 3
        while j < len(text) and text[j].isspace():
            j += 1
        if j >= len(text) or text[j] != "(":
            raise TransformError(f"launch without an argument list at offset {i}")
        args_end = _find_matching(text, j)
        args = text[j + 1:args_end]
        grid, block = cfg[0], cfg[1]
        smem = cfg[2] if len(cfg) > 2 else "0"
        stream = cfg[3] if len(cfg) > 3 else "nullptr"
        label = " ".join(name.split())
        call = (
            f"::cuda_emu::launch({_c_string(label)}, __FILE__, __LINE__, dim3({grid.strip()}), "
            f"dim3({block.strip()}), {smem.strip()}, {stream.strip()}, "
            f"[&](auto&&... cuda_emu_a) {{ {name.strip()}(cuda_emu_a...); }}"
            + (f", {args}" if args.strip() else "")
            + ")"
        )
        # Keep the line count (diagnostics point at the original lines): the newlines of the
        # replaced text that the call does not keep (around `<<<`, `>>>`) go after it.
        missing = text[start:args_end + 1].count("\n") - call.count("\n")
        if missing < 0:
            raise TransformError("launch rewrite added lines")
        out.append(text[pos:start])
        out.append(call + "\n" * missing)
        pos = args_end + 1
        i = pos
        count += 1
    out.append(text[pos:])
    return "".join(out), count


def _c_string(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rewrite_extern_shared(text: str) -> tuple[str, int]:
    def repl(m: re.Match) -> str:
        t = " ".join(m.group("type").split())
        nl = m.group(0).count("\n")
        return f"{t}* const {m.group('name')} = ::cuda_emu::dynamic_smem<{t}>();" + "\n" * nl

    return _EXTERN_SHARED.subn(repl, text)


def transform_source(text: str, origin: str) -> str:
    text, _ = rewrite_extern_shared(text)
    text, _ = rewrite_launches(text)
    if "<<<" in _strip_comments(text) or "extern __shared__" in _strip_comments(text):
        raise TransformError(f"{origin}: a launch or extern __shared__ was left unrewritten")
    return f'#line 1 "{origin}"\n' + text


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def write_shims(shim_dir: Path) -> None:
    shim_dir.mkdir(parents=True, exist_ok=True)
    for h in SHIM_HEADERS:
        (shim_dir / h).write_text(
            f"// {h} -> the CUDA emulation header (tests/cuda_emulation/transform.py)\n"
            f'#pragma once\n#include "{EMU_HEADER}"\n'
        )


def prepare(src_dir: Path, out_dir: Path) -> list[Path]:
    """Transforms src_dir/*.cu and *.cuh into out_dir/src, writes out_dir/shim; returns the
    transformed .cu files (sorted)."""
    src_dir, out_dir = Path(src_dir).resolve(), Path(out_dir)
    dst = out_dir / "src"
    dst.mkdir(parents=True, exist_ok=True)
    write_shims(out_dir / "shim")
    cus = []
    for path in sorted(list(src_dir.glob("*.cu")) + list(src_dir.glob("*.cuh"))):
        (dst / path.name).write_text(transform_source(path.read_text(), str(path)))
        if path.suffix == ".cu":
            cus.append(dst / path.name)
    return cus


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    for p in prepare(Path(argv[1]), Path(argv[2])):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
