"""A 2D map of every image of an index (`mi map`): PCA to PCA_DIMS dimensions, then t-SNE
(openTSNE, which places new points into a fitted map), stored in the index folder as
`map.g<N>.npz` (N: the index generation it shows) and kept up to date without a refit:

- images added since: placed by the fitted map's transform (openTSNE optimises each new point
  against the fixed fitted points), so every point already on the map stays where it was;
- images removed since: dropped;
- a refit (everything laid out again) only with `refit=True`, when there is no map yet, when the
  method changed, or when the images added since the last fit exceed REFIT_SHARE of those it was
  fitted on (new points are placed around the old layout, never shape it; a large share of new
  data deserves its own layout).

Methods: "tsne" (openTSNE, the `curate` extra) and "pca" (the first two principal components,
numpy only: the fallback when openTSNE is not installed, and a quick look). `load_map(folder)`
gives (ids int64, xy float32) for a server to send as compact arrays. The file holds arrays only
(np.load without pickle): ids, xy, the PCA (mean, components) and the fitted points' PCA
coordinates, which the transform needs.

Measured (bench_curate.py --map, 2 shared cores, one thread): openTSNE fit 64 s at 10k, 312 s
at 100k (PCA 4 s / 23 s); placing 1% more images at 100k 13.5 s. umap-learn fit 84-145 s at 10k
and 520 s at 100k (numba compiling included), and its transform needs the pickled model."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from indexer.errors import MIError

PCA_DIMS = 50
REFIT_SHARE = 0.25
PERPLEXITY = 30
# Threads for openTSNE: one for fewer points or on 2 cores (10k points, 2 shared cores: fit 64 s
# on one thread, 86 s on two; OpenMP's spinning costs more than the second core gives).
THREADS_FROM = 10_000
METHODS = ("tsne", "pca")
FILE_PATTERN = re.compile(r"^map\.g(\d+)\.npz$")


class MapError(MIError):
    """No map to read, or a map method that is not installed."""


def default_method() -> str:
    import importlib.util

    return "tsne" if importlib.util.find_spec("openTSNE") is not None else "pca"


def map_files(folder: Path) -> list[tuple[int, Path]]:
    """(generation, path) of the stored maps, oldest first."""
    found = []
    for path in Path(folder).glob("map.g*.npz"):
        match = FILE_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def load_map(index_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 (N,), xy float32 (N, 2)) of the newest stored map, ids ascending. Its generation
    (the N of map.g<N>.npz) may be older than the index's when images were added or removed since
    `mi map` last ran: a server compares it with the index's and drops ids it no longer holds.
    Raises MapError when there is none."""
    stored = _read(Path(index_dir).expanduser())
    return stored["ids"], stored["xy"]


def _read(folder: Path) -> dict[str, Any]:
    files = map_files(folder)
    if not files:
        raise MapError(f"no map in {folder}: make one with `mi map --index {folder}`")
    with np.load(files[-1][1], allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def build_map(reader, *, method: str | None = None, refit: bool = False, seed: int = 0,
              n_jobs: int | None = None) -> dict[str, Any]:
    """Bring the index's map up to date (see the module's docstring); the summary as a dict."""
    start = time.perf_counter()
    method = method or default_method()
    if method not in METHODS:
        raise MapError(f"unknown map method {method!r}; use one of {', '.join(METHODS)}")
    if method == "tsne" and default_method() != "tsne":
        raise MapError("the t-SNE map needs openTSNE: pip install 'medimageinsight-search[curate]' "
                       "(or use --method pca)")
    generation = reader.generation()
    ids = reader.ids()
    try:
        old = _read(reader.folder)
    except MapError:
        old = None
    reason = None
    if refit:
        reason = "asked"
    elif old is None:
        reason = "no map yet"
    elif str(old["method"]) != method:
        reason = f"the method changed ({old['method']} -> {method})"
    kept = np.isin(old["ids"], ids) if old is not None else None
    added = np.setdiff1d(ids, old["ids"]) if old is not None else ids
    if reason is None and len(added) > REFIT_SHARE * int(old["fitted_on"]):
        reason = f"{len(added)} images added since the fit on {int(old['fitted_on'])} (over {REFIT_SHARE:.0%})"
    if reason is not None:
        stored = _fit(reader, ids, method, seed, n_jobs)
        placed = 0
    else:
        stored = {name: old[name] for name in ("mean", "components", "reference", "reference_xy",
                                                     "reference_coords", "fitted_on")}
        xy_new = _place(reader, added, stored, method, seed, n_jobs) if len(added) else np.zeros((0, 2), np.float32)
        stored["ids"] = np.concatenate([old["ids"][kept], added])
        stored["xy"] = np.concatenate([old["xy"][kept], xy_new]).astype(np.float32)
        order = np.argsort(stored["ids"], kind="stable")
        stored["ids"], stored["xy"] = stored["ids"][order], stored["xy"][order]
        placed = len(added)
    if reader.generation() != generation:
        from .neighbours import IndexChangedError
        raise IndexChangedError("mi-index changed the index while the map was made: run mi map again")
    seconds = time.perf_counter() - start
    stored.update(method=np.asarray(method), generation=np.asarray(generation), seconds=np.asarray(seconds))
    path = _write(reader.folder, generation, stored)
    return {"index": str(reader.folder), "generation": generation, "points": int(len(stored["ids"])),
            "method": method, "refit": reason is not None, "refit_reason": reason, "placed": placed,
            "removed": int((~kept).sum()) if kept is not None and reason is None else 0,
            "fitted_on": int(stored["fitted_on"]), "file": path.name, "seconds": round(seconds, 2)}


def _fit(reader, ids: np.ndarray, method: str, seed: int, n_jobs: int | None) -> dict[str, Any]:
    mean, components = _pca(reader, len(ids))
    coords = _project(reader, ids, mean, components)
    if method == "pca" or len(ids) < 4:
        xy = coords[:, :2] if coords.shape[1] >= 2 else np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    else:
        from openTSNE import TSNE

        xy = np.asarray(TSNE(perplexity=_perplexity(len(ids)), n_jobs=n_jobs or _threads(len(ids)),
                             random_state=seed, verbose=False).fit(coords.astype(np.float64)))
    return {"mean": mean, "components": components, "reference": ids, "reference_xy": xy.astype(np.float32),
            "fitted_on": np.asarray(len(ids)), "ids": ids, "xy": xy.astype(np.float32),
            "reference_coords": coords}


def _place(reader, added: np.ndarray, stored: dict[str, Any], method: str, seed: int,
           n_jobs: int | None) -> np.ndarray:
    """xy of images added since the fit, against the fitted points (which do not move)."""
    coords = _project(reader, added, stored["mean"], stored["components"])
    if method == "pca" or len(stored["reference"]) < 4:
        return coords[:, :2].astype(np.float32) if coords.shape[1] >= 2 else np.zeros((len(added), 2), np.float32)
    from openTSNE import TSNEEmbedding
    from openTSNE.affinity import PerplexityBasedNN

    reference = stored["reference_coords"].astype(np.float32)
    affinities = _new_point_affinities(PerplexityBasedNN, reference, _perplexity(len(reference)),
                                       n_jobs or _threads(len(reference)))
    # openTSNE picks the gradient method by the number of *new* points (Barnes-Hut below 10k), but
    # the cost grows with the fitted points: BH rebuilds their quadtree at each of 250 steps (1% more
    # at 40k: 34 s) where FFT interpolates on a grid (1.4 s). Its own threshold, on the fitted points.
    method = "fft" if len(reference) >= THREADS_FROM else "bh"
    embedding = TSNEEmbedding(stored["reference_xy"].astype(np.float64), affinities, random_state=seed,
                              negative_gradient_method=method)
    return np.asarray(embedding.transform(coords.astype(np.float64)), np.float32)


def _new_point_affinities(base, reference: np.ndarray, perplexity: float, n_jobs: int):
    """openTSNE's perplexity-based affinities of new points to the fitted ones (`base` is
    openTSNE.affinity.PerplexityBasedNN: its `to_new` is used unchanged), over an exact FAISS
    kNN of the fitted points' PCA coordinates, without their own kNN graph (openTSNE's __init__
    would build it: the transform never reads it)."""
    from indexer.store.vectors import faiss  # loaded as the search loads it
    from openTSNE.nearest_neighbors import KNNIndex
    from scipy.sparse import csr_matrix

    class ExactFaiss(KNNIndex):
        VALID_METRICS = ["euclidean"]

        def build(self):  # the fitted points' own graph: not needed to place new points
            raise NotImplementedError

        def query(self, query, k):
            squared, found = self.index.search(np.ascontiguousarray(query, np.float32), k)
            return found, np.sqrt(np.maximum(squared, 0.0)).astype(np.float64)   # euclidean, like openTSNE's

    knn = ExactFaiss(reference, k=min(len(reference), int(3 * perplexity)), metric="euclidean", n_jobs=n_jobs)
    knn.index = faiss.IndexFlatL2(reference.shape[1])
    knn.index.add(np.ascontiguousarray(reference))

    class NewPointAffinities(base):
        def __init__(self) -> None:   # base's __init__ would build the fitted points' graph
            self.P = csr_matrix((len(reference), len(reference)))   # empty: only its shape is checked
            self.verbose, self.knn_index = False, knn
            self.perplexity, self.n_jobs, self.symmetrize = perplexity, n_jobs, False

    return NewPointAffinities()


def _threads(n: int) -> int:
    cores = os.cpu_count() or 1
    return 1 if n < THREADS_FROM or cores <= 2 else cores


def _perplexity(n: int) -> float:
    return float(max(1.0, min(PERPLEXITY, (n - 1) / 3.0)))


def _pca(reader, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and the top PCA_DIMS principal directions (P, D) from one streaming pass (the
    D x D covariance, never the N x D matrix)."""
    dim = reader.dim
    total = np.zeros(dim)
    gram = np.zeros((dim, dim))
    for _, vectors in reader.batches(8192):
        v = vectors.astype(np.float64)
        total += v.sum(axis=0)
        gram += v.T @ v
    mean = total / max(n, 1)
    covariance = gram / max(n, 1) - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(covariance)
    top = np.argsort(values)[::-1][:min(PCA_DIMS, dim, max(n - 1, 1))]
    components = vectors[:, top].T
    # a sign per component fixed by the data, so refits of the same data give the same picture
    components *= np.where(components[np.arange(len(top)), np.abs(components).argmax(axis=1)] < 0, -1.0, 1.0)[:, None]
    return mean.astype(np.float32), components.astype(np.float32)


def _project(reader, ids: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    out = np.zeros((len(ids), len(components)), np.float32)
    for start in range(0, len(ids), 8192):
        chunk = ids[start:start + 8192]
        out[start:start + len(chunk)] = (reader.vectors(chunk.tolist()) - mean) @ components.T
    return out


def _write(folder: Path, generation: int, stored: dict[str, Any]) -> Path:
    """map.g<generation>.npz written atomically (tmp, fsync, rename), owner-only; older maps go."""
    from indexer.private_files import owner_only

    target = folder / f"map.g{generation}.npz"
    tmp = folder / f".map.g{generation}.{os.getpid()}.tmp.npz"
    arrays = {name: np.asarray(value) for name, value in stored.items()}
    try:
        with owner_only(), open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    for old_generation, path in map_files(folder):
        if path != target:
            path.unlink(missing_ok=True)
    return target


# ---------------------------------------------------------------- picture
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def draw_png(reader, path: Path, size: int = 1024) -> dict[str, int]:
    """The stored map as a PNG, one dot per image coloured by modality, with a legend; returns
    {modality: images}. Modalities beyond the palette share its last colour (grey: "other")."""
    from PIL import Image, ImageDraw

    ids, xy = load_map(reader.folder)
    columns = reader.columns(["modality"])
    modality_of = dict(zip(columns["id"].tolist(), columns["modality"]))
    names = [str(modality_of.get(int(i)) or "unknown").upper() for i in ids]
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    ranked = sorted(counts, key=lambda m: (-counts[m], m))
    colour = {m: PALETTE[min(r, len(PALETTE) - 1)] for r, m in enumerate(ranked)}
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    margin = 20
    if len(xy):
        lo, hi = xy.min(axis=0), xy.max(axis=0)
        scale = (size - 2 * margin) / np.maximum(hi - lo, 1e-9)
        pixels = ((xy - lo) * scale + margin).astype(int)
        radius = 2 if len(xy) < 20_000 else 1
        for (x, y), name in zip(pixels, names):
            draw.ellipse((x - radius, size - y - radius, x + radius, size - y + radius), fill=colour[name])
    for row, name in enumerate(ranked[:len(PALETTE)]):
        label = name if row < len(PALETTE) - 1 or len(ranked) == len(PALETTE) else "other"
        draw.rectangle((8, 8 + 14 * row, 18, 18 + 14 * row), fill=colour[name])
        shown = counts[name] if label != "other" else sum(counts[m] for m in ranked[row:])
        draw.text((24, 6 + 14 * row), f"{label} ({shown})", fill="black")
    image.save(path, format="PNG")
    return counts
