"""Reading a compiled step's HLO text: the kernels its entry computation launches, the bytes
each must move, and what each fusion computes.

A kernel's bytes are its results written once and its operands read once, as the HLO states
their shapes, except where a fusion needs only part of an operand: the slices it takes (a
layer's weights out of the stacked ones, also after elementwise ops), or none of a buffer it
updates in place. That is the least traffic the kernel can have: over the card's bandwidth, a
lower bound on a memory-bound kernel's time.
"""

from __future__ import annotations

import collections
import functools
import math
import re
from typing import NamedTuple

# Bytes per element of the HLO element types a step uses.
_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2}
_ELEMENT_BYTES |= {"s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
# A computation's first line: `%fused_convert.11 (param_0: bf16[8]) -> bf16[8] {`.
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) ")
# `%name = SHAPE opcode(operands)`, SHAPE an array (`f32[8,128]{1,0}`) or a tuple of them.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\((.*?)\)")
# Ops that move or relabel data without computing: left out of a fusion's description, and
# launching no kernel of their own in the entry computation.
_PLUMBING = set("parameter constant broadcast bitcast reshape tuple get-tuple-element".split())
_NO_KERNEL = _PLUMBING | {"copy-start", "copy-done", "after-all", "partition-id", "opt-barrier"}
_NO_KERNEL |= {"fusion-done"}  # an async fusion's kernel is its fusion-start
# Collectives between devices, as the bytes one device sends over its links with ring
# algorithms: an all-reduce reduces and then gathers (twice a gather's share); a permute sends
# its whole result. An async pair is counted at its `-done`, whose result is the collective's.
_COLLECTIVES = {"all-gather": 1, "reduce-scatter": 1, "all-to-all": 1, "all-reduce": 2}
_COLLECTIVES |= {"collective-permute": 0}
_NO_KERNEL |= {f"{op}-start" for op in _COLLECTIVES}
_SLICES = ("slice", "dynamic-slice")
# Ops whose every output element needs only the same element of each operand.
_ELEMENTWISE = set(
    """abs add and bitcast bitcast-convert cbrt ceil clamp compare convert copy cosine divide erf
    exponential exponential-minus-one floor is-finite log log-plus-one logistic maximum minimum
    multiply negate not or power remainder round-nearest-even rsqrt select sign sine sqrt
    subtract tan tanh xor""".split()
)


class Instruction(NamedTuple):
    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    line: str


class Module(NamedTuple):
    computations: dict[str, list[Instruction]]
    entry: str
    sizes: dict[str, int]  # bytes of each instruction's result, by name


def _arrays(shape: str) -> list[tuple[str, str]]:
    """(element type, dims) of each array in a shape: `(f32[8,128]{1,0}, s32[])`."""
    return re.findall(r"(\w+)\[([\d,]*)\]", shape)


def shape_bytes(shape: str) -> int:
    return sum(
        _ELEMENT_BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in _arrays(shape)
    )


def kernel_name(instruction: str) -> str:
    """The name of the GPU kernel XLA emits for a fusion: `loop_add_fusion.3` -> `..._3`."""
    return re.sub(r"[.\-]", "_", instruction)


@functools.lru_cache(maxsize=2)  # each mode asks several questions of one text
def parse(hlo_text: str) -> Module:
    computations, current, entry = {}, None, ""
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            name, shape, opcode, operands = match.groups()
            operands = tuple(re.findall(r"%([^\s,)]+)", operands))
            current.append(Instruction(name, shape, opcode, operands, line))
    sizes = {i.name: shape_bytes(i.shape) for body in computations.values() for i in body}
    return Module(computations, entry, sizes)


def _called(instruction: Instruction) -> str | None:
    called = re.search(r"calls=%([^\s,]+)", instruction.line)
    return called and called.group(1)


def _elements(shape: str) -> int:
    return sum(math.prod(int(d) for d in dims.split(",") if d) for _, dims in _arrays(shape))


def _bytes_read(body: list[Instruction]) -> int:
    """What a fused computation reads of its parameters: the share of each parameter's elements
    that reaches the result, through slices and elementwise ops (which compute only the
    elements asked of them); none of a buffer updated in place."""
    users = collections.defaultdict(list)
    for instruction in body:
        for operand in set(instruction.operands):  # x * x reads x once
            users[operand].append(instruction)
    root = body[-1].name  # HLO text ends a computation with its ROOT

    @functools.cache
    def share(name: str, elements: int) -> float:
        if name == root:
            return 1.0
        needed = 0.0
        for user in users[name]:
            if user.opcode == "dynamic-update-slice" and user.operands[0] == name:
                continue  # updated in place: only the update moves
            if user.opcode in _SLICES and user.operands[0] == name:
                needed += share(user.name, _elements(user.shape)) * _elements(user.shape) / elements
            elif user.opcode in _ELEMENTWISE and _elements(user.shape) == elements:
                needed += share(user.name, elements)
            else:
                return 1.0
        return min(needed, 1.0)

    params = (i for i in body if i.opcode == "parameter")
    return round(sum(share(i.name, _elements(i.shape)) * shape_bytes(i.shape) for i in params))


def _moved(module: Module, instruction: Instruction) -> int:
    sizes, body = module.sizes, module.computations.get(_called(instruction) or "")
    if not instruction.opcode.startswith("fusion") or body is None:
        return sum(sizes.get(o, 0) for o in instruction.operands) + sizes[instruction.name]
    root = body[-1]  # HLO text ends a computation with its ROOT
    if root.opcode == "dynamic-update-slice":  # writes only the update, in place
        update = next(i for i in body if i.name == root.operands[1])
        return _bytes_read(body) + shape_bytes(update.shape)
    return _bytes_read(body) + sizes[instruction.name]


def _each_fusion(hlo_text: str, measure) -> dict:
    """Kernel name -> measure(module, fusion) for every fusion of the module."""
    module = parse(hlo_text)
    return {
        kernel_name(i.name): measure(module, i)
        for body in module.computations.values()
        for i in body
        if i.opcode == "fusion"
    }


def fusion_bytes(hlo_text: str) -> dict[str, int]:
    """Kernel name -> bytes one launch of that fusion must move: its operands (or the slices it
    takes of them) and results."""
    return _each_fusion(hlo_text, _moved)


def _describe(module: Module, fusion: Instruction) -> str:
    ops = (i.opcode for i in module.computations.get(_called(fusion) or "", ()))
    counts = collections.Counter(op for op in ops if op not in _PLUMBING)
    listed = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in counts.most_common())
    layoutless = re.sub(r"\{[\d,]*\}", "", fusion.shape)  # bf16[8,128]{1,0} -> bf16[8,128]
    return f"{listed} -> {layoutless}"


def fusion_contents(hlo_text: str) -> dict[str, str]:
    """Kernel name -> what that fusion computes: its ops, most frequent first, and its result's
    shape ('multiply x3, erf, add, convert -> bf16[128,196,3072]')."""
    return _each_fusion(hlo_text, _describe)


def _custom_call(instruction: Instruction, module: Module) -> Instruction | None:
    """The library or Pallas call a kernel makes: a custom call itself, or the one a fusion
    wraps (XLA wraps a GEMM that reads weight slices in place in a `dynamic_slice_fusion`)."""
    if instruction.opcode == "custom-call":
        return instruction
    body = module.computations.get(_called(instruction) or "", ())
    return next((i for i in body if i.opcode == "custom-call"), None)


def _call_group(call: Instruction) -> tuple[str, str]:
    """(kind, group) of a custom call: GEMMs by precision, epilogue and output type; cuDNN
    calls by target; Pallas kernels by their name."""
    target = re.search(r'custom_call_target="([^"]+)"', call.line).group(1)
    output = re.match(r"\(?(\w+)\[", call.shape).group(1)
    if target.startswith("__cublas"):
        epilogue = re.search(r'"epilogue":"(\w+)"', call.line)
        precision = "fp8" if target.endswith("f8") else "bf16"
        epilogue = epilogue.group(1) if epilogue else "DEFAULT"
        return "gemm", f"cuBLAS {precision} GEMM, {epilogue} epilogue, writes {output}"
    if target.startswith("__cudnn"):
        return "attention", f"cuDNN {target.removeprefix('__cudnn$')}"
    if "mosaic" in target:  # this package's one Mosaic GPU kernel
        return "gemm", "Pallas q/k/v projection (Mosaic GPU)"
    named = re.search(r'\bname = "(\w+)"', call.line)
    label = f"Pallas {named.group(1) if named else target}"
    return ("attention" if "attention" in label else "fusion"), label


def _group_size(line: str) -> int:
    """Devices in each replica group of a collective: `replica_groups=mesh['data'=2,'fsdp'=4]
    {'fsdp'}` (4), `replica_groups=[2,4]<=[8]` (4) or `replica_groups={{0,1},{2,3}}` (2)."""
    named = re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line)
    if named:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", named.group(1)))
        return math.prod(int(sizes[axis]) for axis in re.findall(r"'(\w+)'", named.group(2)))
    iota = re.search(r"replica_groups=\[\d+,(\d+)\]", line)
    if iota:
        return int(iota.group(1))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    return len(listed.group(1).split(",")) if listed else 1


def _link_bytes(instruction: Instruction, named: dict[str, Instruction], sizes) -> int:
    """What one device sends for a collective: an async one's `-done` takes its operands and
    groups from the `-start` it waits for (`named`: the computation's instructions by name)."""
    done = instruction.opcode.endswith("-done")
    start = named[instruction.operands[0]] if done else instruction
    result = sizes[instruction.name]
    op = start.opcode.removesuffix("-start")
    if op == "collective-permute":
        return result
    whole = max(sum(sizes.get(o, 0) for o in start.operands), result)
    n = _group_size(start.line)
    return round(_COLLECTIVES[op] * whole * (n - 1) / n)


def carried(shape: str) -> str:
    """The element types a collective's result holds ('bf16, f32'): the dtype the devices sum
    gradients in shows here."""
    return ", ".join(sorted({dtype for dtype, _ in _arrays(shape)}))


def _launches(module: Module, computation: str) -> list[dict]:
    found = []
    named = {i.name: i for i in module.computations[computation]}
    for instruction in module.computations[computation]:
        if instruction.opcode in _NO_KERNEL:
            continue
        if instruction.opcode == "while":  # a scanned stack of layers: its body, once per trip
            body = re.search(r"body=%([^\s,]+)", instruction.line).group(1)
            trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', instruction.line)
            found += _launches(module, body) * int(trips.group(1) if trips else 1)
            continue
        collective = instruction.opcode.removesuffix("-done")
        call = _custom_call(instruction, module)
        moved, what = None, None
        if collective in _COLLECTIVES:
            kind, group = "collective", collective
            moved = _link_bytes(instruction, named, module.sizes)
            what = carried(instruction.shape)
        elif call is not None:
            kind, group = _call_group(call)
        elif instruction.opcode in ("fusion", "fusion-start"):
            kind, what = "fusion", _describe(module, instruction)
            # `loop_add_fusion` and `loop_add_fusion.12` -> `loop_add_fusion_#`
            group = re.sub(r"(_\d+)*$", "_#", kernel_name(instruction.name), count=1)
        else:
            kind = group = instruction.opcode
        found.append(
            {
                "name": instruction.name,
                "kind": kind,
                "group": group,
                "bytes": _moved(module, instruction) if moved is None else moved,
                "what": what,
            }
        )
    return found


def kernels(hlo_text: str) -> list[dict]:
    """The kernels one run of the module launches, in order (a while loop's body once per
    trip): name, kind (gemm, attention, fusion, collective or the opcode), group (fusions by
    name with digits masked, custom calls by what they run, collectives by op), bytes moved
    (a collective's: what one device sends over its links) and what: for fusions, what they
    compute; for collectives, the element types they carry."""
    module = parse(hlo_text)
    return _launches(module, module.entry)
