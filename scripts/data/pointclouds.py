"""Point-cloud readers and writers. Every reader returns the same thing: a list of (M_i, 3) float64 arrays in
nanometres and a metadata dict (format, key, unit, what was dropped).

Formats: HDF5 ``(N, M, 3)`` or ``(M, 3)`` (key auto-detected among ``point_clouds``, ``pointclouds``, ``data``),
HDF5 with one dataset or group per cloud (ragged), Picasso HDF5 ``locs`` (x/y in camera pixels), PointNet-style
``data`` (unit-sphere coordinates), ThunderSTORM CSV (``"x [nm]"`` headers) and plain ``x,y,z`` CSV.
"""

import csv
import re
from pathlib import Path

import h5py
import numpy as np
from scripts.runtime.atomic_write import atomic_path
from scripts.runtime.errors import UserError

KNOWN_KEYS = ("point_clouds", "pointclouds", "data")
UNIT_SCALE_NM = {"nm": 1.0, "um": 1000.0, "µm": 1000.0, "micron": 1000.0, "mm": 1e6, "px": None, "pixel": None}
CSV_HEADER = ['"x [nm]"', '"y [nm]"', '"z [nm]"']


def read_point_clouds(
    path, key=None, unit=None, pixel_size_nm=None, zero_is_padding=False, strict=False, actual_point_counts=None
):
    """Read every cloud in ``path`` as (M_i, 3) float64 arrays in nanometres.

    Args:
        path: an HDF5 (``.h5``, ``.hdf5``, ``.hdf``) or CSV (``.csv``, ``.txt``, ``.tsv``) file.
        key: HDF5 dataset or group holding the clouds; auto-detected when ``None``.
        unit: unit of coordinates that do not state their own (HDF5 arrays, plain CSV): nm, um, mm or px. ``None``:
            the HDF5 ``unit`` attribute (of the dataset, else of the file) where there is one, else nm; a given unit
            that contradicts the attribute is refused.
        pixel_size_nm: camera pixel size for coordinates in pixels (Picasso); read from the ``.yaml`` beside the
            file when ``None``.
        zero_is_padding: drop rows that are exactly (0, 0, 0); by default zero is a valid coordinate.
        strict: refuse NaN/Inf coordinates instead of dropping and counting them.
        actual_point_counts: per-cloud counts; rows beyond them are padding. Read from the file's
            ``actual_point_counts`` dataset when ``None``.

    Returns:
        ``(clouds, meta)``; ``meta`` has ``format``, ``key``, ``unit``, ``n_clouds``, ``padding_dropped``,
        ``nonfinite_dropped`` (points with a NaN/Inf coordinate), ``nonfinite_clouds`` (clouds that had any) and
        ``dims`` (2 when the file has no z: z is then 0).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give one point-cloud file (HDF5 or CSV)")
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if _is_hdf5(path):
        raw, meta = _read_hdf5(path, key, unit, pixel_size_nm, actual_point_counts)
    elif path.suffix.lower() in (".csv", ".txt", ".tsv"):
        raw, meta = _read_csv(path, unit, pixel_size_nm)
    else:
        raise UserError(f"{path}: not an HDF5 or CSV file (expected .h5/.hdf5 or .csv)")
    clouds, padding, nonfinite, nonfinite_clouds = [], 0, 0, 0
    for i, pts in enumerate(raw):
        all_nan = np.all(np.isnan(pts), axis=1)
        pad = all_nan | (np.all(pts == 0, axis=1) if zero_is_padding else False)
        bad = ~pad & ~np.all(np.isfinite(pts), axis=1)
        if strict and bad.any():
            raise UserError(f"{path}: cloud {i} has {int(bad.sum())} NaN/Inf coordinates (refused by --strict)")
        keep = pts[~pad & ~bad]
        if len(keep) == 0:
            raise UserError(f"{path}: cloud {i} is empty (no finite points after removing padding)")
        padding += int(pad.sum())
        nonfinite += int(bad.sum())
        nonfinite_clouds += int(bad.any())
        clouds.append(np.ascontiguousarray(keep, dtype=np.float64))
    meta.update(source=str(path), n_clouds=len(clouds), padding_dropped=padding, nonfinite_dropped=nonfinite)
    meta["nonfinite_clouds"] = nonfinite_clouds
    meta.setdefault("dims", 3)
    return clouds, meta


def _is_hdf5(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def _unit_scale(path, unit, pixel_size_nm):
    unit = "nm" if unit is None else str(unit).strip().lower()
    if unit not in UNIT_SCALE_NM:
        raise UserError(f"{path}: unknown unit {unit!r} (expected one of {', '.join(UNIT_SCALE_NM)})")
    if UNIT_SCALE_NM[unit] is not None:
        return UNIT_SCALE_NM[unit]
    if pixel_size_nm is None:
        raise UserError(f"{path}: coordinates are in camera pixels; give --pixel_size (nm)")
    return float(pixel_size_nm)


def _xyz(path, arr, scale, where):
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise UserError(f"{path}: {where} has shape {arr.shape}, expected (M, 3) points with x, y, z")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{path}: {where} holds {arr.dtype} values, expected numbers")
    return arr.astype(np.float64) * scale


def _read_hdf5(path, key, unit, pixel_size_nm, counts):
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: cannot open as HDF5 ({e})") from None
    with f:
        if key is None and "locs" in f and f["locs"].dtype.names:
            return _read_picasso(path, f["locs"], pixel_size_nm)
        if key is None:
            key = next((k for k in KNOWN_KEYS if k in f), None)
            if key is None and _ragged_members(f):
                key = "/"
            if key is None:
                raise UserError(f"{path}: no point-cloud key found; keys in the file: {', '.join(f.keys()) or 'none'}")
        elif key not in f:
            raise UserError(f"{path}: key {key!r} not found; keys in the file: {', '.join(f.keys()) or 'none'}")
        node = f[key]
        pointnet = key == "data" and "label" in f
        unit = _hdf5_unit(path, f, node, unit)
        scale = 1.0 if pointnet else _unit_scale(path, unit, pixel_size_nm)
        meta = {"format": "pointnet" if pointnet else "hdf5", "key": key, "unit": "unitless" if pointnet else "nm"}
        if unit is not None and not pointnet:
            meta["unit_read"] = unit
        if isinstance(node, h5py.Group):
            members = _ragged_members(node)
            if not members:
                raise UserError(f"{path}: group {key!r} holds no (M, 3) datasets; members: {', '.join(node.keys())}")
            meta["format"] = "hdf5-ragged"
            meta["members"] = [name for name, _ in members]
            return [_xyz(path, ds[()], scale, f"{key}/{name}") for name, ds in members], meta
        if node.dtype.names:
            return _read_picasso(path, node, pixel_size_nm)
        arr = node[()]
        if arr.ndim == 2:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise UserError(f"{path}: dataset {key!r} has shape {node.shape}, expected (N, M, 3) or (M, 3)")
        if counts is None and "actual_point_counts" in f:
            counts = f["actual_point_counts"][()]
        clouds = [_xyz(path, c, scale, f"{key}[{i}]") for i, c in enumerate(arr)]
        if counts is not None:
            counts = np.asarray(counts).reshape(-1)
            if len(counts) != len(clouds) or np.any(counts < 0) or np.any(counts > arr.shape[1]):
                raise UserError(f"{path}: actual_point_counts does not match dataset {key!r} of shape {node.shape}")
            meta["padding_by_counts"] = int(sum(arr.shape[1] - c for c in counts))
            clouds = [c[: int(n)] for c, n in zip(clouds, counts)]
        return clouds, meta


def _hdf5_unit(path, f, node, unit):
    """The unit of an HDF5 array: the ``unit`` attribute of the dataset (else of the file), checked against a given
    ``unit``."""
    stated = node.attrs.get("unit", f.attrs.get("unit"))
    if isinstance(stated, bytes):
        stated = stated.decode(errors="replace")
    if stated is None:
        return unit
    stated = str(stated).strip().lower()
    given = None if unit is None else str(unit).strip().lower()
    if given is not None and UNIT_SCALE_NM.get(given, given) != UNIT_SCALE_NM.get(stated, stated):
        raise UserError(f"{path}: the file says its coordinates are in {stated!r}, but --unit {unit} was given")
    return stated


def _ragged_members(group):
    """(name, dataset) for each (M, 3) dataset in ``group`` or in a sub-group holding exactly one, sorted naturally."""
    members = []
    for name, item in group.items():
        if isinstance(item, h5py.Group):
            inner = [v for v in item.values() if isinstance(v, h5py.Dataset)]
            item = inner[0] if len(inner) == 1 else None
        if isinstance(item, h5py.Dataset) and item.ndim == 2 and item.shape[1] == 3 and not item.dtype.names:
            members.append((name, item))
    if len(members) != len(group):
        return []
    return sorted(members, key=lambda m: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", m[0])])


def _read_picasso(path, locs, pixel_size_nm):
    names = locs.dtype.names
    if "x" not in names or "y" not in names:
        raise UserError(f"{path}: structured dataset {locs.name!r} has no x/y fields (fields: {', '.join(names)})")
    if pixel_size_nm is None:
        pixel_size_nm = _picasso_pixel_size(path)
    data = locs[()]
    z = data["z"].astype(np.float64) if "z" in names else np.zeros(len(data))  # Picasso stores z in nm
    pts = np.stack([data["x"] * float(pixel_size_nm), data["y"] * float(pixel_size_nm), z], axis=1)
    meta = {"format": "picasso", "key": locs.name.lstrip("/"), "unit": "nm", "pixel_size_nm": pixel_size_nm}
    return [pts], dict(meta, dims=3 if "z" in names else 2)


def _picasso_pixel_size(path):
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        raise UserError(
            f"{path}: Picasso x/y are in camera pixels; give --pixel_size (nm) or put {yaml_path.name} beside it"
        )
    match = re.search(r"^\s*Pixelsize:\s*([0-9.eE+-]+)\s*$", yaml_path.read_text(errors="replace"), re.MULTILINE)
    if not match:
        raise UserError(f"{yaml_path}: no 'Pixelsize' entry; give --pixel_size (nm)")
    return float(match.group(1))


def _read_csv(path, unit, pixel_size_nm):
    with open(path, newline="", errors="replace") as f:
        head = f.readline()
        if not head.strip():
            raise UserError(f"{path}: empty file")
        dialect = csv.Sniffer().sniff(head, delimiters=",;\t ")
        header = next(csv.reader([head], dialect))
    names = [h.strip().strip('"').strip() for h in header]
    cols, units = {}, set()
    for i, name in enumerate(names):
        m = re.fullmatch(r"([xyz])(?:\s*[\[(]\s*([^\])]+?)\s*[\])])?", name.lower())
        if m and m.group(1) not in cols:
            cols[m.group(1)] = i
            units.add(m.group(2) or unit)
    if "x" not in cols or "y" not in cols:
        raise UserError(f"{path}: no x/y columns in the header (found: {', '.join(names)})")
    if len(units) > 1:
        raise UserError(f"{path}: x, y and z are in different units ({', '.join(sorted(units))})")
    scale = _unit_scale(path, units.pop(), pixel_size_nm)
    usecols = [cols["x"], cols["y"]] + ([cols["z"]] if "z" in cols else [])
    delimiter = None if dialect.delimiter == " " else dialect.delimiter
    try:
        arr = np.loadtxt(path, delimiter=delimiter, skiprows=1, usecols=usecols, ndmin=2, dtype=np.float64)
    except ValueError as e:
        raise UserError(f"{path}: cannot parse the x/y/z columns as numbers ({e})") from None
    if "z" not in cols:
        arr = np.column_stack([arr, np.zeros(len(arr))])
    fmt = "thunderstorm-csv" if any("[" in n for n in names) else "csv"
    return [arr * scale], {"format": fmt, "key": None, "unit": "nm", "dims": 3 if "z" in cols else 2}


def write_points_csv(path, points):
    """Write an (M, 3) cloud in nanometres as a CSV with ThunderSTORM headers, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(",".join(CSV_HEADER) + "\n")
            np.savetxt(f, np.asarray(points, np.float64), fmt="%.3f", delimiter=",")


def write_point_clouds_h5(path, clouds, sample_ids=None):
    """Write clouds in the training HDF5 layout, atomically.

    Datasets: ``point_clouds`` ``(N, M_max, 3)`` float32 in nm, rows beyond each cloud's count set to NaN;
    ``actual_point_counts`` ``(N,)`` int64; ``sample_ids`` ``(N,)`` int64 (default ``0..N-1``). Attribute
    ``unit = "nm"``. The folder is created if missing.
    """
    path = Path(path)
    clouds = [np.asarray(c, dtype=np.float32) for c in clouds]
    if not clouds:
        raise UserError(f"{path}: no clouds to write")
    for i, cloud in enumerate(clouds):
        if cloud.ndim != 2 or cloud.shape[1] != 3:
            raise UserError(f"{path}: cloud {i} has shape {cloud.shape}, expected (M, 3)")
    counts = np.array([len(c) for c in clouds], dtype=np.int64)
    ids = np.arange(len(clouds), dtype=np.int64) if sample_ids is None else np.asarray(sample_ids, dtype=np.int64)
    if ids.shape != counts.shape:
        raise UserError(f"{path}: {len(ids)} sample_ids for {len(clouds)} clouds")
    padded = np.full((len(clouds), counts.max(), 3), np.nan, dtype=np.float32)
    for i, cloud in enumerate(clouds):
        padded[i, : len(cloud)] = cloud
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["unit"] = "nm"
            f.create_dataset("point_clouds", data=padded)
            f.create_dataset("actual_point_counts", data=counts)
            f.create_dataset("sample_ids", data=ids)
    return path


# bytes of one point in a CSV written by write_points_csv: "-99999.999" three times, two commas and a newline
CSV_POINT_BYTES = 33
H5_POINT_BYTES = 12  # float32 x, y, z in the HDF5 layout


class PointCloudsH5Writer:
    """Write clouds one at a time in the layout of :func:`write_point_clouds_h5`, holding none of them: the datasets
    grow as clouds are appended (rows beyond a cloud's count read as NaN). A context manager: the file appears at
    ``path`` in one rename when the block ends without an error, and not at all otherwise.

    Args:
        path: the HDF5 file to write; its folder is created if missing.
        chunk_points: points per HDF5 chunk of ``point_clouds`` (a cloud takes whole chunks: small ones waste less).
    """

    def __init__(self, path, chunk_points=4096):
        self.path, self.chunk_points = Path(path), chunk_points

    def __enter__(self):
        from contextlib import ExitStack

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self.file = self._stack.enter_context(h5py.File(tmp, "w"))
        self.file.attrs["unit"] = "nm"
        self.clouds = self.file.create_dataset(
            "point_clouds",
            (0, 0, 3),
            np.float32,
            maxshape=(None, None, 3),
            chunks=(1, self.chunk_points, 3),
            fillvalue=np.nan,
        )
        self.counts = self.file.create_dataset("actual_point_counts", (0,), np.int64, maxshape=(None,))
        self.ids = self.file.create_dataset("sample_ids", (0,), np.int64, maxshape=(None,))
        return self

    def append(self, cloud, sample_id=None):
        """Add one (M, 3) cloud in nm (``sample_id``: default its position in the file)."""
        cloud = np.asarray(cloud, dtype=np.float32)
        n = len(self.counts)
        if cloud.ndim != 2 or cloud.shape[1] != 3:
            raise UserError(f"{self.path}: cloud {n} has shape {cloud.shape}, expected (M, 3)")
        self.clouds.resize((n + 1, max(self.clouds.shape[1], len(cloud)), 3))
        self.clouds[n, : len(cloud)] = cloud
        for dataset, value in ((self.counts, len(cloud)), (self.ids, n if sample_id is None else sample_id)):
            dataset.resize((n + 1,))
            dataset[n] = value

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and len(self.counts) == 0:
            error = UserError(f"{self.path}: no clouds to write")
            self._stack.__exit__(UserError, error, None)  # unwound as an error: the temporary file is removed
            raise error
        return self._stack.__exit__(exc_type, exc, tb)
