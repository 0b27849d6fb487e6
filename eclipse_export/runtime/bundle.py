"""Bundle = a directory of graphs + tokenizer + scheduler config + negative embedding, described
by `manifest.json`. Reading and verifying it needs no torch (the edge runtime does it).

A manifest is untrusted input: `open_bundle` checks its whole structure, and every path in it,
once, before anything is loaded. Every file the runtime (or an engine loader) opens afterwards
goes through `Bundle.path`, which hands out only paths that are `files` entries: relative, inside
the bundle after symlinks are resolved, and size/hash-verified. The graphs name files too (their
external data), which a backend would open itself: `open_bundle` reads those references
(onnx_refs.py) and requires them to be exactly the component's other `files`, and `graph_path`,
through which every backend gets its graph, checks again for bundles built in memory. So no
bundle can make the runtime or a backend open a file outside the bundle, and a damaged one is
one `BundleError`, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from eclipse_export.families import DEFAULT_FAMILY, Family, UnknownFamily, get_family
from eclipse_export.runtime.onnx_refs import ORT_MEMORY_TAG, OnnxRefsError, external_data_refs

FORMAT = "eclipse-export-bundle"
# 2: the manifest names its model family ("family") and may carry the ONNX Runtime device loop's
# step graphs ("step_graphs"). Format 1 bundles (no family: all ECLIPSE + Kandinsky 2.2, no step
# graphs) are still read.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
# What the runtime reads from a manifest, and so what open_bundle checks. The components, dims
# and files a bundle must have come from its family (families/).
PRECISIONS = ("fp32", "fp16", "int8")
ENGINE_FLAVOURS = ("tensorrt", "tensorrt-rtx")
# the guided scheduler step as ONNX graphs, with and without classifier-free guidance
# cfg / plain: the Kandinsky UNet loop; unclip_*: Karlo's loops (export/step_graph.py)
STEP_GRAPH_KINDS = ("cfg", "plain", "unclip_learned_cfg", "unclip_learned", "unclip_fixed")
# Far above any real stack (bigG: D = E = 1280, T = 77) and small enough that arrays sized from
# them cannot exhaust memory before a graph refuses them.
MAX_DIM = 1 << 16
_SHA256 = re.compile(r"[0-9a-f]{64}")


class BundleError(RuntimeError):
    """The bundle cannot be used; the message says what is wrong and what to do."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(root: Path, rel: str) -> dict:
    path = root / rel
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict
    # the relative paths the runtime may open: a verified manifest's `files` (see open_bundle)
    files: frozenset[str] = field(default_factory=frozenset)
    # components whose graph's external-data references passed check_graph (read once per bundle)
    _checked_graphs: set = field(default_factory=set, init=False, compare=False, repr=False)

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def family(self) -> Family:
        return get_family(family_name(self.manifest))

    def step_graph_path(self, kind: str) -> Path | None:
        """The ONNX Runtime device loop's step graph of `kind` (cfg / plain); None in bundles
        exported before step graphs were written into them (format 1)."""
        rel = (self.manifest.get("step_graphs") or {}).get(kind)
        if rel is None:
            return None
        self._check(f"step_graphs.{kind}", rel, set())  # written whole by export: no external data
        return self.path(rel)

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.manifest["dims"])

    def component(self, name: str) -> dict:
        return self.manifest["components"][name]

    def graph_path(self, name: str) -> Path:
        """The component's graph, for a backend to load: its external data is checked first."""
        self.check_graph(name)
        return self.path(self.component(name)["graph"])

    def check_graph(self, name: str) -> None:
        """Refuse a graph whose external data is not exactly its component's other `files`
        (see external_data_problems). Every backend gets its graph through graph_path, so no
        backend ever opens a file the manifest does not list and verify, whatever its version."""
        c = self.component(name)
        self._check(name, c["graph"], set(c.get("files", [c["graph"]])) - {c["graph"]})

    def _check(self, owner: str, graph: str, data_files: set[str]) -> None:
        if owner in self._checked_graphs:
            return
        problems = reference_problems(self, owner, graph, data_files)
        if problems:
            raise BundleError(f"bundle {self.root}: the {owner} graph {graph} cannot be loaded: "
                              + "; ".join(problems) + f"; {_hint(self.root)}")
        self._checked_graphs.add(owner)

    def path(self, rel: str) -> Path:
        """The path of a file the manifest lists; anything else is refused."""
        if rel not in self.files:
            raise BundleError(f"bundle {self.root} does not list {rel!r} in its manifest's files; "
                              f"{_hint(self.root)}")
        return self.root / rel

    def has(self, rel: str) -> bool:
        return rel in self.files

    def component_bytes(self, name: str) -> int:
        """Size on disk of a component's graph files (graph + external data)."""
        return sum(self.path(f).stat().st_size for f in self.component(name)["files"])

    def json(self, rel: str) -> dict:
        try:
            value = json.loads(self.path(rel).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise BundleError(f"{self.root / rel} is unreadable ({e}); {_hint(self.root)}") from None
        if not isinstance(value, dict):
            raise BundleError(f"{self.root / rel} does not hold a JSON object; {_hint(self.root)}")
        return value


def _hint(root: Path) -> str:
    return f"re-export it (eclipse-export ... --out {root})"


def open_bundle(root: str | Path, verify_hashes: bool = True) -> Bundle:
    """Read and verify a bundle. Raises BundleError listing every problem found."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist or is not a directory; create one with eclipse-export")
    try:
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{root} has no {MANIFEST}: not a bundle, or an export that did not finish; {_hint(root)}") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{root / MANIFEST} is unreadable ({e}); {_hint(root)}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{root} is not an eclipse-export bundle (format {found!r})")
    version = manifest.get("format_version")
    if not _is_int(version) or version < 1:
        raise BundleError(f"{root / MANIFEST}: format_version must be a positive integer, got {version!r}; {_hint(root)}")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{root} has bundle format {version}, newer than this runtime reads ({FORMAT_VERSION}); "
            "upgrade eclipse-export, or re-export the bundle with this version"
        )

    try:
        get_family(family_name(manifest))
    except UnknownFamily as e:
        raise BundleError(f"{root}: {e}; upgrade eclipse-export, or re-export the bundle with this version") from None
    problems = manifest_problems(manifest)
    if problems:  # structure first: a malformed entry must not be followed to the file system
        raise BundleError(f"{root / MANIFEST} is invalid: " + "; ".join(problems) + f"; {_hint(root)}")
    problems = _file_problems(root, manifest["files"], verify_hashes)
    if problems:
        raise BundleError(f"bundle {root} is damaged: " + "; ".join(problems) + f"; {_hint(root)}")
    bundle = Bundle(root, manifest, frozenset(manifest["files"]))
    for name in bundle.family.components:  # the graphs' own file references, before any backend sees them
        bundle.check_graph(name)
    for kind in manifest.get("step_graphs") or {}:
        bundle.step_graph_path(kind)
    return bundle


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unsafe_path_reason(rel) -> str | None:
    """Why `rel` cannot name a file inside a bundle (None: it can). Lexical only: symlinks are
    checked against the real directory in _file_problems."""
    if not isinstance(rel, str) or not rel:
        return "is not a non-empty string"
    if "\\" in rel or "\x00" in rel or ":" in rel:
        return "holds a backslash, NUL or colon"
    p = PurePosixPath(rel)
    if p.is_absolute():
        return "is absolute"
    if any(part in ("..", ".") for part in rel.split("/")) or str(p) != rel:
        return "is not a plain relative path (., .. or empty parts)"
    if rel == MANIFEST:
        return "is the manifest itself"
    return None


def family_name(m: dict):
    """The manifest's model family (format 1 manifests carry none: Kandinsky 2.2)."""
    return m.get("family", DEFAULT_FAMILY) if m.get("format_version") == 1 else m.get("family")


def manifest_problems(m: dict) -> list[str]:
    """Everything wrong with the manifest's structure: types, required keys, paths, ranges."""
    problems: list[str] = []
    try:
        family = get_family(family_name(m))
    except UnknownFamily as e:
        return [str(e)]
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        return ["'files' must be a non-empty object"]
    for rel, entry in files.items():
        why = unsafe_path_reason(rel)
        if why:
            problems.append(f"files entry {rel!r} {why}")
        elif not isinstance(entry, dict):
            problems.append(f"files[{rel!r}] must be an object")
        else:
            if not (isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
                problems.append(f"files[{rel!r}].sha256 must be 64 lowercase hex digits")
            if not (_is_int(entry.get("bytes")) and entry["bytes"] >= 0):
                problems.append(f"files[{rel!r}].bytes must be a non-negative integer")

    def listed(where: str, rel) -> None:
        if unsafe_path_reason(rel) or rel not in files:
            problems.append(f"{where} {rel!r} is not one of the manifest's files")

    for rel in family.required_files:
        listed("required file", rel)
    if m.get("precision") not in PRECISIONS:
        problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {m.get('precision')!r}")
    dims = m.get("dims")
    if not isinstance(dims, dict):
        problems.append("'dims' must be an object")
    else:
        for k in family.dim_names:
            if not (_is_int(dims.get(k)) and 1 <= dims[k] <= MAX_DIM):
                problems.append(f"dims.{k} must be an integer in 1..{MAX_DIM}, got {dims.get(k)!r}")
    components = m.get("components")
    if not isinstance(components, dict) or set(components) != set(family.components):
        got = sorted(components) if isinstance(components, dict) else components
        problems.append(f"'components' must name exactly {', '.join(family.components)}, got {got!r}")
    else:
        for name, c in components.items():
            if not isinstance(c, dict):
                problems.append(f"components.{name} must be an object")
                continue
            listed(f"components.{name}.graph", c.get("graph"))
            graph_files = c.get("files")
            if not isinstance(graph_files, list) or c.get("graph") not in graph_files:
                problems.append(f"components.{name}.files must be a list holding its graph")
            else:
                for rel in graph_files:
                    listed(f"components.{name}.files entry", rel)
    engines = m.get("engines") or {}
    if not isinstance(engines, dict):
        problems.append("'engines' must be an object")
        engines = {}
    for name, e in engines.items():
        if name not in family.components or not isinstance(e, dict):
            problems.append(f"engines.{name} must be an object of a known component")
            continue
        listed(f"engines.{name}.file", e.get("file"))
        if e.get("flavour") not in ENGINE_FLAVOURS:
            problems.append(f"engines.{name}.flavour must be one of {', '.join(ENGINE_FLAVOURS)}")
        if not isinstance(e.get("version"), str) or not isinstance(e.get("key"), str):
            problems.append(f"engines.{name}.version and .key must be strings")
        ccs = e.get("compute_capabilities")
        if not isinstance(ccs, list) or not all(isinstance(c, str) for c in ccs):
            problems.append(f"engines.{name}.compute_capabilities must be a list of strings")
    steps = m.get("step_graphs") or {}
    if not isinstance(steps, dict) or not set(steps) <= set(STEP_GRAPH_KINDS):
        problems.append(f"'step_graphs' must be an object with keys among {', '.join(STEP_GRAPH_KINDS)}")
    else:
        for kind, rel in steps.items():
            listed(f"step_graphs.{kind}", rel)
    return problems


def _file_problems(root: Path, files: dict, verify_hashes: bool) -> list[str]:
    problems = []
    real_root = root.resolve()
    for rel, entry in sorted(files.items()):
        path = root / rel
        try:
            inside = path.resolve().is_relative_to(real_root)
        except (OSError, RuntimeError):  # a symlink loop
            inside = False
        if not inside:
            problems.append(f"{rel} resolves outside the bundle (a symlink?)")
        elif not path.is_file():
            problems.append(f"missing {rel}")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif verify_hashes and sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel} was altered (sha256 differs from the manifest)")
    return problems


def external_data_problems(bundle: Bundle, name: str) -> list[str]:
    """How the external-data references of component `name`'s graph depart from the rule: each
    location is a plain relative path (relative to the graph's folder) naming one of the
    component's own `files` other than the graph, inside the bundle after symlinks are resolved,
    with offset + length within that file; and every such file is used. `files` minus the graph
    is then exactly the graph's external data (export writes it so; bundles of graphs without
    external data list the graph alone)."""
    c = bundle.component(name)
    return reference_problems(bundle, name, c["graph"], set(c.get("files", [c["graph"]])) - {c["graph"]})


def reference_problems(bundle: Bundle, name: str, graph: str, data_files: set[str]) -> list[str]:
    """The rule of external_data_problems for any graph of the bundle (`name` owns it, and may
    reference exactly `data_files`: none for the step graphs)."""
    try:
        refs = external_data_refs(bundle.path(graph))
    except OnnxRefsError as e:
        return [f"its protobuf is malformed ({e})"]
    except OSError as e:
        return [f"it is unreadable ({e})"]
    folder = PurePosixPath(graph).parent
    real_root = bundle.root.resolve()
    problems, used = [], set()
    for ref in refs:
        where = f"tensor {_short(ref.tensor)} names external data {_short(ref.location)}"
        why = unsafe_path_reason(ref.location)
        if ref.location == ORT_MEMORY_TAG:
            why = "is ONNX Runtime's in-memory address tag"
        if why:
            problems.append(f"{where}, which {why}")
            continue
        rel = str(folder / ref.location)
        if rel not in data_files:
            owners = [n for n, o in bundle.manifest["components"].items()
                      if n != name and isinstance(o, dict) and rel in o.get("files", ())]
            whose = f" (it is {owners[0]}'s)" if owners else ""
            problems.append(f"{where}, which is not one of {name}'s external data files "
                            f"{sorted(data_files)}{whose}")
            continue
        path = bundle.path(rel)
        try:
            inside = path.resolve().is_relative_to(real_root)
            size = path.stat().st_size
        except (OSError, RuntimeError):
            inside, size = False, 0
        if not inside:
            problems.append(f"{where}, which resolves outside the bundle")
            continue
        if ref.offset > size or (ref.length is not None and ref.length > size - ref.offset):
            length = "the rest" if ref.length is None else f"{ref.length} bytes"
            problems.append(f"{where} at offset {ref.offset} ({length}), past the end of its {size} bytes")
            continue
        used.add(rel)
    if not problems and used != data_files:
        problems.append(f"components.{name}.files lists {sorted(data_files - used)}, which its graph does not use")
    return problems


def _short(text: str, limit: int = 80) -> str:
    """A name from a graph, quoted and cut (it is untrusted and can be any length)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def trusted_bundle(root: Path, manifest: dict, files: Iterable[str]) -> Bundle:
    """A bundle this process is writing (export's calibration pass): no manifest on disk yet."""
    return Bundle(root, manifest, frozenset(files))
