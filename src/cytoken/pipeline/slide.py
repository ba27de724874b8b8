"""Whole-slide segmentation: streaming, bounded memory, resumable.

Stages, overlapped:

1. **Read** (DataLoader worker processes): each worker re-opens the slide and reads tiles of the slide as if it were
   resampled to the model's µm/px (:meth:`Slide.read_scaled`), so 20× slides are upsampled on the fly.
2. **Infer** (main process): batches of tiles through the model.
3. **Decode** (a process pool): HoVer post-processing of each tile; a tile keeps only the cells whose centroid lies
   in its core (:meth:`TileGrid.keep`), so every cell is kept exactly once, decided per tile as tiles finish.
4. **Spill**: each finished *chunk* (a fixed group of ``batch_size`` consecutive tiles) is written to
   ``<out>/.<stem>.partial/chunks/`` with its cells already in level-0 slide pixels; ``plan.json`` (written once)
   records the run's settings and tiles, ``done.jsonl`` gets one line per finished chunk (append-only, so its cost
   does not grow with the slide). Memory holds at most a few chunks, whatever the slide size.
5. **Assemble**: chunks are streamed in order into the output files (ids 1..N), inside an atomic folder.

``--resume`` skips finished chunks; chunks are fixed groups of tiles, so a resumed run computes exactly the same
batches and writes byte-identical cell files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from cytoken.io.atomic import atomic_write_text
from cytoken.io.cellstore import load_cells, save_cells
from cytoken.io.slide import open_slide
from cytoken.io.slide.base import Slide
from cytoken.io.slide.tissue import detect_tissue, load_tissue_mask
from cytoken.io.tiling import Tile, TileGrid, model_image_size, mpp_scale
from cytoken.pipeline.image import SegmentConfig, decode_spec, slide_channel_plan
from cytoken.pipeline.outputs import CellOutputWriter, OutputWriteError, output_folder, writing
from cytoken.pipeline.predictor import Predictor
from cytoken.pipeline.procs import RssMonitor, die_with_parent, loader_worker_init
from cytoken.pipeline.tiles import ChannelPlan, DecodeSpec, decode_tile
from cytoken.types import Bounds, CellSet, CytokenError
from cytoken.weights import ModelInfo

__all__ = ["SlideConfig", "segment_slide"]


@dataclass(frozen=True)
class SlideConfig:
    """Options of :func:`segment_slide`.

    Attributes:
        segment: inference options (batch size, tile size, overlap, device, embeddings, post-processing).
        mpp: level-0 µm/px, overriding the slide's metadata (``--mpp``).
        roi: only this level-0 rectangle (``--roi x,y,w,h``).
        tissue_mask: a binary image covering the slide (``--tissue-mask``); default: detect tissue on a thumbnail.
        detect_tissue: skip tiles without tissue (on by default).
        read_workers: tile-reading worker processes (0 = read in the main process).
        decode_workers: post-processing worker processes (0 = decode in the main process).
        resume: continue an interrupted run from its spilled chunks.
        classifier: a classifier bundle that re-labels cells from their embeddings as chunks are assembled.
        gzip_geojson: write ``cells.geojson.gz``.
    """

    segment: SegmentConfig = field(default_factory=SegmentConfig)
    mpp: float | None = None
    roi: Bounds | None = None
    tissue_mask: Path | None = None
    detect_tissue: bool = True
    read_workers: int = 1
    decode_workers: int = 1
    resume: bool = False
    gzip_geojson: bool = True
    classifier: Any = None


class _TileReader(TorchDataset):
    """Reads tiles by index; each worker process opens its own slide handle."""

    def __init__(
        self, slide: Slide, tiles: list[Tile], tile_size: int, model_mpp: float, channels: ChannelPlan | None = None
    ) -> None:
        self.slide = slide
        self.tiles = tiles
        self.tile_size = tile_size
        self.model_mpp = model_mpp
        self.channels = channels  # multi-channel models: (C, tile, tile) float windows instead of RGB
        self._handle: Slide | None = None

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | _ReadFailure]:
        # a failed read is returned, not raised: raised in a worker process, torch would wrap it in its own
        # multi-line "Caught ... in DataLoader worker process" report
        try:
            if self._handle is None:
                self._handle = self.slide.reopen() if torch.utils.data.get_worker_info() else self.slide
            t = self.tiles[i]
            if self.channels is not None:
                return i, self.channels.read_slide_tile(self._handle, t.bounds, self.model_mpp)
            return i, self._handle.read_scaled(t.bounds, self.model_mpp)
        except Exception as exc:
            return i, _ReadFailure(i, str(exc) if isinstance(exc, CytokenError) else f"{type(exc).__name__}: {exc}")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handle"] = None
        return state


@dataclass(frozen=True)
class _ReadFailure:
    """A tile that could not be read: its position in the reader's tile list and the reason."""

    position: int
    reason: str


def _collate(batch: list[tuple[int, np.ndarray | _ReadFailure]]) -> tuple[list[int], np.ndarray | _ReadFailure]:
    for _, arr in batch:
        if isinstance(arr, _ReadFailure):
            return [b[0] for b in batch], arr
    return [b[0] for b in batch], np.stack([b[1] for b in batch])  # type: ignore[misc]


def _read_error(path: Path, tile: Tile, scale: float, reason: str, work: Path) -> CytokenError:
    """One line naming the slide, the tile and its level-0 window, the reader's reason and the kept work."""
    b = tile.bounds
    x0, y0 = int(np.floor(b.x / scale)), int(np.floor(b.y / scale))
    x1, y1 = int(np.ceil(b.x1 / scale)), int(np.ceil(b.y1 / scale))
    reason = reason.removeprefix(f"{path}: ")
    return CytokenError(
        f"{path}: cannot read tile {tile.index} (row {tile.row}, column {tile.col}; level-0 x={x0} y={y0} "
        f"{x1 - x0}x{y1 - y0} px): {reason}; the finished tiles are kept in {work} (--resume continues from them)"
    )


def _decode_job(args: tuple) -> CellSet:
    nuc, hv, tp, tok, tile, grid, spec, scale, slide_mpp = args
    cells = decode_tile(nuc, hv, tp, tok, tile, grid, spec).cells
    return cells.transformed(1.0 / scale, mpp=slide_mpp)


def _plan(
    slide: Slide, config: SlideConfig, tile: int, overlap: int, model_mpp: float
) -> tuple[TileGrid, list[Tile], float]:
    scale = mpp_scale(slide.mpp, model_mpp)
    full_w, full_h = model_image_size(slide.dimensions, scale)
    if config.roi is not None:
        r = config.roi
        x0, y0 = int(np.floor(r.x * scale)), int(np.floor(r.y * scale))
        x1, y1 = int(np.ceil(r.x1 * scale)), int(np.ceil(r.y1 * scale))
        grid = TileGrid((max(1, x1 - x0), max(1, y1 - y0)), tile, overlap, origin=(x0, y0))
    else:
        grid = TileGrid((full_w, full_h), tile, overlap)
    mask = None
    if config.tissue_mask is not None:
        mask = load_tissue_mask(config.tissue_mask, slide.dimensions)
    elif config.detect_tissue and slide.is_rgb:  # fluorescence slides: no RGB thumbnail, every tile is read
        thumb, _ = slide.thumbnail(2048)
        mask = detect_tissue(thumb)
    whole = Bounds(0, 0, full_w, full_h)
    tiles = list(grid.tiles(mask, mask_extent=whole)) if mask is not None else list(grid.tiles())
    return grid, tiles, scale


def segment_slide(
    path: str | Path,
    out_dir: str | Path,
    predictor: Predictor,
    info: ModelInfo,
    config: SlideConfig | None = None,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Segment a whole slide into ``out_dir/<stem>/`` with bounded memory; returns the run summary.

    The summary (also ``run.json``) counts the tiles (``tiles``: over tissue; ``tiles_segmented`` in this run,
    ``tiles_resumed`` from an earlier run's chunks, ``tiles_without_tissue`` skipped), and records the real
    ``wall_seconds`` with ``stage_seconds`` (``plan``, ``tiles``, ``assemble``) and the peak resident memory of
    the main process (``peak_rss_main_mb``) and of the whole process tree with the worker processes
    (``peak_rss_tree_mb``).

    Raises:
        CytokenError: unreadable slide (names the backends tried), µm/px missing or coarser than 0.75, a tile
            that cannot be read (names the tile and its level-0 window), unwritable output, or a finished run's
            partial folder that does not match (on ``resume``).
    """
    config = config or SlideConfig()
    predictor.require(tta=config.segment.tta, amp=config.segment.amp)
    t0 = time.time()
    path = Path(path)
    out_dir = Path(out_dir)
    final = out_dir / path.stem
    work = out_dir / f".{path.stem}.partial"
    seg = predictor.model
    mc = seg.config  # type: ignore[attr-defined]
    tile = config.segment.tile_size or mc.tile_size
    overlap = mc.overlap if config.segment.overlap is None else config.segment.overlap
    with RssMonitor() as memory:
        slide = open_slide(path, mpp=config.mpp)  # refuses slides coarser than MAX_SLIDE_MPP
        try:
            channels = slide_channel_plan(slide, mc, config.segment)
            grid, tiles, scale = _plan(slide, config, tile, overlap, mc.mpp)
            spec = decode_spec(seg, config.segment)
            bs = config.segment.batch_size
            chunks = [list(range(i, min(i + bs, len(tiles)))) for i in range(0, len(tiles), bs)]
            plan_key = {"slide": str(path.resolve()), "model": info.sha256, "tiles": [t.index for t in tiles],
                        "tile": tile, "overlap": overlap, "mpp": slide.mpp, "batch": bs,
                        "embeddings": config.segment.embeddings}  # fmt: skip
            if channels is not None:
                plan_key["channels"] = channels.describe()
            with writing(work):
                done = _prepare_workdir(work, plan_key, config.resume)
                _remove_stale_tmp(out_dir, path.stem)
            resumed = sum(len(chunks[c]) for c in done)
            stats: dict[str, Any] = {"tiles_in_grid": len(grid), "tiles_without_tissue": len(grid) - len(tiles),
                                     "tiles_segmented": len(tiles) - resumed, "tiles_resumed": resumed}  # fmt: skip
            t_plan = time.time()
            try:
                _run_chunks(slide, tiles, grid, chunks, done, work, predictor, spec, scale, tile, mc.mpp, config,
                            progress, channels=channels)  # fmt: skip
                t_tiles = time.time()
                stats["stage_seconds"] = {"plan": round(t_plan - t0, 2), "tiles": round(t_tiles - t_plan, 2)}
                summary = _assemble(path, final, work, chunks, slide, info, config, predictor, tiles, scale, t0,
                                    stats, memory, channels=channels)  # fmt: skip
            except OutputWriteError as exc:  # the finished chunks are intact: say how to reuse them
                raise OutputWriteError(f"{exc}; the finished tiles are kept in {work}, rerun with --resume to "
                                       "continue from them") from exc  # fmt: skip
        finally:
            slide.close()
    shutil.rmtree(work, ignore_errors=True)
    return summary


_PLAN, _DONE, _LEGACY = "plan.json", "done.jsonl", "progress.json"  # progress.json: cytoken <= 0.1 partial folders


def _prepare_workdir(work: Path, plan_key: dict, resume: bool) -> set[int]:
    """Start a fresh work folder, or (``resume``) check the earlier run's plan and return its finished chunks."""
    plan, legacy = work / _PLAN, work / _LEGACY
    if resume and (plan.is_file() or legacy.is_file()):
        if plan.is_file():
            earlier, done = json.loads(plan.read_text()), _done_chunks(work)
        else:
            state = json.loads(legacy.read_text())
            earlier, done = state.get("plan"), {int(c) for c in state.get("done", [])}
        if earlier != plan_key:
            raise CytokenError(f"--resume: {work} belongs to a run with other settings (slide, model, tiles or "
                               "batch size differ); remove it or rerun without --resume")  # fmt: skip
        done = {c for c in done if (work / "chunks" / f"{c:06d}.npz").is_file()}
        # rewrite the record whole once: no cut last line for the next appends to continue, no legacy file
        atomic_write_text(plan, json.dumps(plan_key))
        atomic_write_text(work / _DONE, "".join(json.dumps({"chunk": c}) + "\n" for c in sorted(done)))
        legacy.unlink(missing_ok=True)
        return done
    if work.exists():
        shutil.rmtree(work)
    (work / "chunks").mkdir(parents=True)
    atomic_write_text(plan, json.dumps(plan_key))
    return set()


def _done_chunks(work: Path) -> set[int]:
    """Chunks listed in ``done.jsonl``; a last line cut short by a kill is ignored."""
    done: set[int] = set()
    try:
        lines = (work / _DONE).read_text().splitlines()
    except FileNotFoundError:
        return done
    for line in lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            done.add(int(json.loads(line)["chunk"]))
    return done


def _record_done(work: Path, chunk: int) -> None:
    with writing(work / _DONE), open(work / _DONE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"chunk": chunk}) + "\n")


def _remove_stale_tmp(out_dir: Path, stem: str) -> None:
    """Remove the temporary output folders (``.<stem>.<8 random chars>.tmp``) that a killed run left behind."""
    name = re.compile(rf"\.{re.escape(stem)}\.[a-z0-9_]{{8}}\.tmp")
    for p in out_dir.iterdir():
        if name.fullmatch(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _run_chunks(slide: Slide, tiles: list[Tile], grid: TileGrid, chunks: list[list[int]], done: set[int],
                work: Path, predictor: Predictor, spec: DecodeSpec, scale: float, tile: int, model_mpp: float,
                config: SlideConfig, progress: bool, channels: ChannelPlan | None = None) -> None:  # fmt: skip
    todo = [c for c in range(len(chunks)) if c not in done]
    if not todo:
        return
    order = [i for c in todo for i in chunks[c]]
    reader = _TileReader(slide, [tiles[i] for i in order], tile, model_mpp, channels)
    bs = config.segment.batch_size
    parent = os.getpid()  # worker processes are killed with this one (Linux), see cytoken.pipeline.procs
    workers = config.read_workers
    loader = DataLoader(reader, batch_size=bs, num_workers=workers, collate_fn=_collate,
                        prefetch_factor=2 if workers else None, multiprocessing_context="spawn" if workers else None,
                        worker_init_fn=functools.partial(loader_worker_init, parent) if workers else None)  # fmt: skip
    pool = None
    if config.decode_workers:
        pool = ProcessPoolExecutor(config.decode_workers, mp_context=get_context("spawn"),
                                   initializer=die_with_parent, initargs=(parent,))  # fmt: skip
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tiles), initial=sum(len(chunks[c]) for c in done), desc="tiles", unit="tile",
                   dynamic_ncols=True)  # fmt: skip
    pending: deque[tuple[int, list[Future | CellSet]]] = deque()

    def flush(block: bool) -> None:
        while pending and (block or all(not isinstance(f, Future) or f.done() for f in pending[0][1])):
            c, futs = pending.popleft()
            parts = [f.result() if isinstance(f, Future) else f for f in futs]
            cells = CellSet.concat(parts, renumber=False) if parts else None
            with writing(work / "chunks" / f"{c:06d}.npz"):
                if cells is not None:
                    save_cells(cells, work / "chunks" / f"{c:06d}.npz")
            _record_done(work, c)  # after the chunk file is complete
            if bar is not None:
                bar.update(len(chunks[c]))

    try:
        it = iter(loader)
        for c in todo:
            _, batch = next(it)
            if isinstance(batch, _ReadFailure):
                flush(block=True)  # keep the chunks decoded so far
                raise _read_error(Path(str(slide.path)), reader.tiles[batch.position], scale, batch.reason, work)
            outs = predictor(batch)
            jobs: list[Future | CellSet] = []
            for i, out in zip(chunks[c], outs):
                args = (
                    out.nuclei_prob,
                    out.hv,
                    out.type_prob,
                    out.tokens,
                    tiles[i],
                    grid,
                    spec,
                    scale,
                    slide.mpp,
                )
                jobs.append(pool.submit(_decode_job, args) if pool else _decode_job(args))
            pending.append((c, jobs))
            flush(block=len(pending) > 2 * max(1, config.decode_workers))
        flush(block=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()


def _assemble(
    path: Path, final: Path, work: Path, chunks: list[list[int]], slide: Slide, info: ModelInfo,
    config: SlideConfig, predictor: Predictor, tiles: list[Tile], scale: float, t0: float, stats: dict[str, Any],
    memory: RssMonitor, channels: ChannelPlan | None = None,
) -> dict:  # fmt: skip
    from cytoken.pipeline.classifier import classifier_record, relabel
    from cytoken.pipeline.run import embedding_dim_of, run_info, type_map_of

    mc = predictor.model.config  # type: ignore[attr-defined]
    names = tuple(mc.names) if mc.num_classes else ()
    if config.classifier is not None:
        names = tuple(config.classifier.class_names)
    meta = {"slide": str(path), "mpp": slide.mpp, "model": info.name, "model_sha256": info.sha256}
    next_id = 1
    t_assemble = time.time()
    with output_folder(final) as tmp:
        writer = CellOutputWriter(
            tmp, final=final, gzip_geojson=config.gzip_geojson, type_map=type_map_of(names),
            wsi_metadata={"base_mpp": slide.mpp, "target_patch_mpp": mc.mpp, "shape": list(slide.dimensions)},
            geojson_meta=meta, id_seed=f"{path.name}:{info.sha256}",
            embedding_dim=embedding_dim_of(predictor, config.segment),  # (0, D) embeddings.npy without cells
        )  # fmt: skip
        try:
            for c in range(len(chunks)):
                f = work / "chunks" / f"{c:06d}.npz"
                if not f.is_file():
                    continue
                cells = load_cells(f)
                if config.classifier is not None:
                    cells = relabel(cells, config.classifier)
                cells.ids = np.arange(next_id, next_id + len(cells), dtype=np.int64)
                next_id += len(cells)
                writer.add(cells)
            if not tiles:
                import warnings

                warnings.warn(f"{path}: no tissue found; the output is empty", stacklevel=2)
            now = time.time()
            memory.sample()
            stats["stage_seconds"]["assemble"] = round(now - t_assemble, 2)
            summary = writer.close(run_info(
                path, info, config.segment, predictor, mpp=slide.mpp, scale_to_model=scale, tiles=len(tiles),
                **stats, slide_dimensions=list(slide.dimensions), backend=getattr(slide, "backend", None),
                roi=None if config.roi is None else [config.roi.x, config.roi.y, config.roi.width, config.roi.height],
                read_workers=config.read_workers, decode_workers=config.decode_workers,
                peak_rss_main_mb=memory.peak_main_mb, peak_rss_tree_mb=memory.peak_tree_mb,
                tiles_per_second=round(stats["tiles_segmented"] / max(1e-9, now - t0), 3),
                **({} if channels is None else {"channels": channels.describe()}),
                classifier=classifier_record(config.classifier),
            ), started=t0)  # fmt: skip
        except BaseException:
            writer.abort()
            raise
    summary["output"] = str(final)
    return summary


def cpu_count() -> int:
    """Usable CPU cores."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
