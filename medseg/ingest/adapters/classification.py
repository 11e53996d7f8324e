"""Image classification datasets: one NIfTI image per subject and a CSV of class labels and covariates.

Layout::

    SRC/labels.csv                          subject,label,age[,sex]  (or subjects.csv, or the only .csv)
    SRC/<subject>.nii.gz                    the subject's image, or
    SRC/images/<subject>.nii.gz             in an images/ folder, or
    SRC/<subject>/<anything>.nii.gz         a folder per subject holding one NIfTI file

Typical use: Alzheimer's disease staging (CN / MCI / AD) from a T1-weighted MRI, with age and sex as
covariates.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from medseg.errors import MedsegError
from medseg.ingest.adapters.base import Adapter, Reporter, SourceCase, Volume, strip_nifti_ending, subfolders

CSV_NAMES = ("labels.csv", "subjects.csv")  # looked for in this order; else the only .csv of SRC
IMAGES_FOLDER = "images"
REQUIRED_COLUMNS = ("subject", "label", "age")
# Class orders with a clinical meaning, kept when the dataset's classes are (a subset of) one of them;
# other class sets are numbered in sorted order.
KNOWN_CLASS_ORDERS: tuple[tuple[str, ...], ...] = (("CN", "MCI", "AD"),)
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # the subject id becomes a file name
_SEX_CODES = {"m": "M", "male": "M", "f": "F", "female": "F"}


@dataclass
class _SubjectRow:
    """What the CSV says about one subject (the first row, if it is listed more than once)."""

    subject: str
    rows: list[int]  # 1-based line numbers in the CSV (header = line 1)
    label: str | None
    covariates: dict[str, Any]
    problems: list[str]


class ClassificationAdapter(Adapter):
    """Subjects' NIfTI images with class labels and covariates (age, sex) from a CSV.

    The CSV is ``labels.csv``, ``subjects.csv`` or the only ``.csv`` file in ``SRC``; its header
    (case-insensitive) must hold ``subject``, ``label`` and ``age``; ``sex`` is optional and other
    columns are ignored. Each subject has one 3D image (channel ``image``): ``<subject>.nii[.gz]`` in
    ``SRC`` or ``SRC/images``, or the one NIfTI file of a folder ``SRC/<subject>/``.

    :meth:`configure` reads the classes from the CSV: ``labels`` maps class name → index, in sorted
    order, except that clinical orders (CN, MCI, AD) are kept when the classes are among them (CN=0,
    MCI=1, AD=2; CN/AD alone gives CN=0, AD=1). Each case gets ``class_label`` and ``covariates``
    ``{"age": float (years), "sex": "M" | "F" | as written}``; the patient id is the subject id.

    Problems reported (naming the CSV or the image): a CSV row without an image, an image without a CSV
    row, a non-numeric or empty age, an empty label, a subject listed twice, a subject id that is not
    usable as a file name, a subject folder with several NIfTI files, a subject with two images.
    A CSV without the required columns stops ingest with an error naming the file.
    """

    name: ClassVar[str] = "classification"
    description: ClassVar[str] = "classification: <subject>.nii.gz (or images/, or <subject>/) + labels.csv (subject,label,age[,sex])"
    task: str = "classification"
    channel_names = ("image",)
    covariates: tuple[str, ...] = ("age",)  # required by the CSV; a classifier may take it (sex is recorded, not used)
    labels: dict[str, int] = {}
    regions: dict[str, list[int]] = {}
    label_remap: dict[int, int] = {}
    pseudonymize_by_default: ClassVar[bool] = False

    def detect(self, src: Path) -> bool:
        try:
            csv_path = find_labels_csv(src)
        except MedsegError:
            return False
        if csv_path is None:
            return False
        try:
            with open(csv_path, encoding="utf-8-sig", newline="") as fh:
                first_line = fh.readline(65536)  # the header only: detection stays cheap
            header = next(csv.reader([first_line], dialect=_sniff_dialect(first_line)), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            return False
        names = {column.strip().lower() for column in header}
        return {"subject", "label"} <= names

    def configure(self, src: Path) -> ClassificationAdapter:
        """The adapter with ``labels`` = the CSV's classes → index (see the class docstring for the order)."""
        rows = read_subject_table(_require_csv(src))
        classes = class_order({row.label for row in rows.values() if row.label})
        return self.with_definitions(  # type: ignore[return-value]
            labels={name: index for index, name in enumerate(classes)}, regions={}, channel_names=("image",)
        )

    def discover(self, src: Path) -> list[SourceCase]:
        csv_path = _require_csv(src)
        rows = read_subject_table(csv_path)
        images, image_problems = _find_images(src)
        cases: list[SourceCase] = []
        for subject, row in rows.items():
            paths = images.get(subject, [])
            problems = [(csv_path.name, f"row {row.rows[0]}: {problem}") for problem in row.problems]
            problems.extend(image_problems.get(subject, []))
            if not paths and subject not in image_problems:
                problems.append((csv_path.name, f"row {row.rows[0]}: no image for subject {subject!r} "
                                                f"(looked for {subject}.nii[.gz] in the folder and in {IMAGES_FOLDER}/, "
                                                f"and for a folder {subject}/)"))
            elif len(paths) > 1:
                problems.append((paths[1].name, f"second image for subject {subject!r} (also {_relative(paths[0], src)})"))
            cases.append(SourceCase(
                case_id=subject,
                patient_id=subject,
                channel_files={"image": paths[0] if paths else src / f"{subject}.nii.gz"},
                label_file=None,
                folder=paths[0].parent if paths else src,
                class_label=row.label,
                covariates=dict(row.covariates),
                problems=problems,
            ))
        for subject in sorted(set(images) - set(rows)):
            paths = images[subject]
            problems = [(paths[0].name, f"image has no row in {csv_path.name} (no class label)")]
            problems.extend(image_problems.get(subject, []))
            cases.append(SourceCase(
                case_id=subject, patient_id=subject, channel_files={"image": paths[0]},
                folder=paths[0].parent, problems=problems,
            ))
        for subject in sorted(set(image_problems) - set(rows) - set(images)):  # e.g. a folder with 2 NIfTI files
            cases.append(SourceCase(
                case_id=subject, patient_id=subject, channel_files={"image": src / subject},
                folder=src / subject, problems=list(image_problems[subject]),
            ))
        return sorted(cases, key=lambda c: (c.case_id, str(c.folder)))

    def read_images(self, case: SourceCase, report: Reporter) -> dict[str, Volume]:
        """The image of ``case`` (when it has one; discovery problems were reported by validation)."""
        image = case.channel_files.get("image")
        if image is None or not image.is_file():
            if not case.problems:
                report(image or case.case_id, "missing image file")
            return {}
        return super().read_images(case, report)


def find_labels_csv(src: Path) -> Path | None:
    """``labels.csv`` / ``subjects.csv`` in ``src``, else its only ``.csv``; None when there is none.

    Several ``.csv`` files and none of the known names: MedsegError listing them (which one is meant?).
    """
    for name in CSV_NAMES:
        if (src / name).is_file():
            return src / name
    candidates = sorted(p for p in src.glob("*.csv") if p.is_file() and not p.name.startswith("."))
    if len(candidates) > 1:
        raise MedsegError(
            f"several CSV files ({', '.join(p.name for p in candidates)}): name the labels file "
            f"{' or '.join(CSV_NAMES)}", src)
    return candidates[0] if candidates else None


def read_subject_table(csv_path: Path) -> dict[str, _SubjectRow]:
    """The CSV's rows by subject id, with each row's problems (values are not trusted, never raised on).

    Raises MedsegError naming the file only for a file that cannot be used at all (unreadable, no
    header, a required column missing).
    """
    try:
        text = csv_path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet exports start with a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise MedsegError(f"cannot read the CSV ({type(exc).__name__}: {exc})", csv_path) from None
    lines = text.splitlines()
    if not lines:
        raise MedsegError("the CSV is empty (expected a header subject,label,age[,sex])", csv_path)
    try:
        table = list(csv.reader(lines, dialect=_sniff_dialect(lines[0])))
    except csv.Error as exc:
        raise MedsegError(f"not a valid CSV ({exc})", csv_path) from None
    header = [column.strip().lower() for column in table[0]]
    missing = [column for column in REQUIRED_COLUMNS if column not in header]
    if missing:
        raise MedsegError(f"the CSV has no column(s) {', '.join(missing)} (header: {', '.join(table[0])}; "
                          f"expected subject,label,age[,sex])", csv_path)
    index = {column: header.index(column) for column in (*REQUIRED_COLUMNS, "sex") if column in header}
    rows: dict[str, _SubjectRow] = {}
    for line_number, cells in enumerate(table[1:], start=2):
        if not any(cell.strip() for cell in cells):
            continue  # blank line

        def cell(column: str) -> str:
            position = index.get(column)
            return cells[position].strip() if position is not None and position < len(cells) else ""

        subject = cell("subject")
        problems: list[str] = []
        if not subject:
            subject = f"{csv_path.name}-row-{line_number}"  # a stand-in id, so the row shows in the problems
            problems.append("empty subject id")
        elif not _SAFE_ID.match(subject):
            problems.append(f"subject id {subject!r} has characters other than letters, digits, '.', '_', '-' "
                            "(it becomes a file name)")
        if subject in rows:
            earlier = rows[subject]
            earlier.rows.append(line_number)
            duplicate = f"subject listed {len(earlier.rows)} times (rows {', '.join(map(str, earlier.rows))})"
            earlier.problems = [p for p in earlier.problems if not p.startswith("subject listed")] + [duplicate]
            continue
        label = cell("label") or None
        if label is None:
            problems.append("empty label")
        covariates: dict[str, Any] = {}
        age_text = cell("age")
        try:
            age = float(age_text)
            if age != age or age in (float("inf"), float("-inf")):  # NaN / inf parse as floats
                raise ValueError
            covariates["age"] = age
        except ValueError:
            problems.append(f"age {age_text!r} is not a number" if age_text else "empty age")
        sex = cell("sex")
        if sex:
            covariates["sex"] = _SEX_CODES.get(sex.lower(), sex)
        rows[subject] = _SubjectRow(subject, [line_number], label, covariates, problems)
    return rows


def class_order(classes: set[str]) -> list[str]:
    """The classes in index order: a known clinical order when they fit one, else sorted."""
    for order in KNOWN_CLASS_ORDERS:
        if len(classes) >= 2 and classes <= set(order):
            return [name for name in order if name in classes]
    return sorted(classes)


def _require_csv(src: Path) -> Path:
    csv_path = find_labels_csv(src)
    if csv_path is None:
        raise MedsegError(f"no {' or '.join(CSV_NAMES)} (or other single .csv file) with subject,label,age", src)
    return csv_path


def _sniff_dialect(header_line: str) -> type[csv.Dialect] | csv.Dialect:
    """Comma, semicolon or tab, as the header line uses (spreadsheets in some locales write ';')."""
    try:
        return csv.Sniffer().sniff(header_line, delimiters=",;\t")
    except csv.Error:
        return csv.excel


def _find_images(src: Path) -> tuple[dict[str, list[Path]], dict[str, list[tuple[str, str]]]]:
    """Images by subject id (all places looked in), and problems of subject folders by subject id."""
    images: dict[str, list[Path]] = {}
    problems: dict[str, list[tuple[str, str]]] = {}
    for folder in (src, src / IMAGES_FOLDER):
        for path in _nifti_files(folder):
            images.setdefault(strip_nifti_ending(path.name) or path.name, []).append(path)
    for folder in subfolders(src):
        if folder.name == IMAGES_FOLDER:
            continue
        found = _nifti_files(folder)
        if len(found) == 1:
            images.setdefault(folder.name, []).append(found[0])
        elif len(found) > 1:
            problems.setdefault(folder.name, []).append(
                (folder.name, f"subject folder holds {len(found)} NIfTI files ({', '.join(p.name for p in found)}); expected one"))
    return images, problems


def _nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and strip_nifti_ending(p.name) is not None)


def _relative(path: Path, src: Path) -> str:
    try:
        return str(path.relative_to(src))
    except ValueError:
        return str(path)
