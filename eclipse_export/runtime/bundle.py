"""Bundle = a directory of graphs + tokenizer + scheduler config + negative embedding, described
by `manifest.json`. Reading and verifying it needs no torch (the edge runtime does it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

FORMAT = "eclipse-export-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


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

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.manifest["dims"])

    def component(self, name: str) -> dict:
        return self.manifest["components"][name]

    def graph_path(self, name: str) -> Path:
        return self.root / self.component(name)["graph"]

    def path(self, rel: str) -> Path:
        return self.root / rel

    def json(self, rel: str) -> dict:
        return json.loads((self.root / rel).read_text())


def _hint(root: Path) -> str:
    return f"re-export it (eclipse-export ... --out {root})"


def open_bundle(root: str | Path, verify_hashes: bool = True) -> Bundle:
    """Read and verify a bundle. Raises BundleError listing every problem found."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist or is not a directory; create one with eclipse-export")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise BundleError(f"{root} has no {MANIFEST}: not a bundle, or an export that did not finish; {_hint(root)}") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{root / MANIFEST} is unreadable ({e}); {_hint(root)}") from None

    if manifest.get("format") != FORMAT:
        raise BundleError(f"{root} is not an eclipse-export bundle (format {manifest.get('format')!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise BundleError(
            f"{root} has bundle format {version}, newer than this runtime reads ({FORMAT_VERSION}); "
            "upgrade eclipse-export, or re-export the bundle with this version"
        )

    problems = []
    for rel, entry in sorted(manifest.get("files", {}).items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"missing {rel}")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{rel} has {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif verify_hashes and sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel} was altered (sha256 differs from the manifest)")
    if problems:
        raise BundleError(f"bundle {root} is damaged: " + "; ".join(problems) + f"; {_hint(root)}")
    return Bundle(root, manifest)
