"""Every config surface of alignfl as a pydantic model.

Flower hands us flat ``run_config`` / ``node_config`` dicts (bool/int/float/str values, dashed keys).
``RunConfig`` keeps those flat keys (users and experiment files rely on them) but groups them into typed
sections, one per concern (run, data, local training, privacy, Lipschitz, server, baselines); list-valued
strings are parsed once here. The model holds the defaults (pyproject.toml's ``[tool.flwr.app.config]``
must equal them, a test checks it) and turns any problem into a one-line ``ConfigError`` naming the key
and the fix.
"""

from __future__ import annotations

import os
import re
import tomllib
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)

from alignfl_app.data.catalog import CATALOG
from alignfl_app.resources import conf_dir

CLASS_NAMES = {name: info.class_names for name, info in CATALOG.items()}
NUM_CLASSES = {name: len(classes) for name, classes in CLASS_NAMES.items()}
IMAGE_SHAPE = (1, 28, 28)  # the default image-size and channels (MNIST's own shape)
MAX_LATENT_COMPONENTS = 64  # a released decoder's mixture layer: components per class
MAX_SILOS = 1000  # silos of one run (silo-classes groups): every round asks, stores and draws from each
MAX_CLASSES = 1000  # a folder dataset's label space: the global classifier has an output per class
BUILT_IN_DATASETS = tuple(CATALOG)
CLASS_NAME_PATTERN = r"^[^\x00-\x1f/\\]{1,64}$"  # a class name: printable, no path separators
# how each kind of global model is judged on real test data (summary keys: global.<m>, eval-<m>, final-global-<m>)
HEADLINE_METRIC = {"classifier": "accuracy", "vae": "neg-elbo"}
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a name, never a path: no "/", no leading "."
DeviceChoice = Literal["auto", "cpu", "cuda"]
"""auto: a CUDA GPU when torch sees one, else the CPU; cuda: a GPU or a one-line error."""


def headline_metric(run_config: dict[str, Any]) -> str:
    """The metric that judges a run, from its (flat, hyphenated) run config: see HEADLINE_METRIC."""
    return HEADLINE_METRIC[str(run_config.get("global-model", "classifier"))]


class ConfigError(ValueError):
    """A configuration problem, phrased as one line that names the fix."""


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def one_line(err: ValidationError, source: str) -> str:
    """Flatten a pydantic error into one line: ``source: key: message`` (the flat key, not the section)."""
    first = err.errors()[0]
    loc = str(first["loc"][-1]) if first["loc"] else "(root)"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


class ArchitectureSpec(BaseModel):
    """A silo's generator architecture (``conf/architectures/<name>.toml``); the decoder half travels to the server
    inside the descriptor. ``kind`` names its family (alignfl_app/models/families/), which checks the rest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    kind: str = Field(pattern=NAME_PATTERN)
    latent_dim: int = Field(default=0, ge=0, le=256)
    """VAE families: the latent's size (required)."""
    hidden: tuple[int, ...] = Field(default=(), max_length=4)
    """MLP: widths of the hidden layers (encoder order). Conv: channels of the stride-2 stages."""
    components: int = Field(default=0, ge=0, le=8)
    """gaussian family: Gaussian components per class in feature space (required)."""
    refine: int = Field(default=0, ge=0, le=3)
    """Conv only: stride-1 3x3 layers the decoder adds at each resolution below the image's own, so each upsampled
    feature map is reworked before the next stage (detail a single transposed conv per stage cannot draw)."""

    @field_validator("hidden")
    @classmethod
    def _widths_in_range(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(w < 1 or w > 4096 for w in v):
            raise ValueError("every hidden width must be in 1..4096")
        return v

    @model_validator(mode="after")
    def _family_accepts_it(self) -> ArchitectureSpec:
        from alignfl_app.models.families import FAMILIES  # the families import this module

        if self.kind not in FAMILIES:
            raise ValueError(f"unknown kind '{self.kind}': use one of {sorted(FAMILIES)}")
        FAMILIES[self.kind].check_spec(self)
        return self

    def check_fits(self, image_shape: tuple[int, int, int]) -> None:
        """ConfigError unless this architecture can encode and decode images of ``image_shape`` (its family's
        rule)."""
        from alignfl_app.models.families import family_of

        family_of(self.kind).check_fits(self, image_shape)


def check_name(name: str) -> str:
    """A name that becomes part of a file name must not be a path."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"'{name}' is not a name (1-64 letters, digits, '_', '-', '.'; no '/', no leading '.')")
    return name


def load_architecture(name: str, directory: Path | None = None) -> ArchitectureSpec:
    """Read ``conf/architectures/<name>.toml``; unknown names list what exists."""
    try:
        check_name(name)
    except ValueError as exc:
        raise ConfigError(f"architecture {exc}") from exc
    directory = directory or conf_dir() / "architectures"
    path = directory / f"{name}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.toml"))
        raise ConfigError(f"unknown architecture '{name}': add {path} or use one of {known}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the file") from exc
    raw.setdefault("name", name)
    try:
        return ArchitectureSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(one_line(exc, str(path))) from exc


def _int_list(text: str, sep: str = ",") -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(sep) if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"expected integers separated by '{sep}', got '{text}'") from exc


def _class_name_list(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [n for n in names if not re.fullmatch(CLASS_NAME_PATTERN, n) or n in (".", "..") or ";" in n]
    if bad:
        raise ValueError(f"'{bad[0]}' is not a class name (1-64 printable characters, no '/', '\\', ',' or ';')")
    return names


def parse_image_size(text: str) -> tuple[int, int]:
    """``"32x32"`` (height x width) -> (32, 32)."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match:
        raise ValueError(f"image-size must be 'HEIGHTxWIDTH', e.g. '32x32'; got '{text}'")
    size = int(match.group(1)), int(match.group(2))
    if any(not 4 <= s <= 512 for s in size):
        raise ValueError(f"image-size sides must be in 4..512, got '{text}'")
    return size


def _resolve_against_project(path: str, project_dir: Path | None = None) -> Path:
    """Relative paths resolve against ``project_dir``, else $ALIGNFL_PROJECT_DIR (set by scripts/run and for every
    Flower process alignfl starts), else the current folder."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        base = project_dir or os.environ.get("ALIGNFL_PROJECT_DIR")
        p = (Path(base) if base else Path.cwd()) / p
    return p


def machine_dir(env_var: str, name: str) -> Path:
    """A folder set by this machine's environment (never by the run config), else ~/.cache/alignfl/<name>."""
    env = os.environ.get(env_var)
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "alignfl" / name


def resolve_data_root(data_root: str = "") -> Path:
    """Where datasets live: explicit value, else $ALIGNFL_DATA_ROOT, else ~/.cache/alignfl/data."""
    return Path(data_root).expanduser().resolve() if data_root else machine_dir("ALIGNFL_DATA_ROOT", "data")


class Section(BaseModel):
    """A group of flat run-config keys: each field's alias is its key in ``[tool.flwr.app.config]``."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=_dashed, populate_by_name=True, frozen=True, allow_inf_nan=False
    )


class RunSection(Section):
    """Where results go and how long the federation runs."""

    run_name: str = ""
    """results/<run-name>/: a name, never a path; empty: <dataset>-<timestamp>-<run id>."""
    results_dir: str = "results"
    seed: int = Field(default=42, ge=0, lt=2**63)
    num_server_rounds: int = Field(default=4, ge=1, le=1000)
    round_timeout: float = Field(default=3600.0, gt=0, le=7 * 24 * 3600)
    resume: bool = False
    """Continue results/<run-name>/ from its last completed round (checkpoint/), with every stored generator."""
    min_silos: int = Field(default=0, ge=0, le=MAX_SILOS)
    """Silos that must be connected when the run starts (else it stops, naming the fix); 0: every configured silo."""
    silo_nodes: dict[str, int] = Field(default_factory=dict)
    """Flat form ``"hospital-a=123,hospital-b=456"``: the operator's binding of silo names to SuperNode ids (the
    ids the SuperLink gave their registered keys); only these nodes are asked, each only for its own silo. Empty:
    a name is bound to the first node that sends a valid generator under it and never moves for the run."""
    tracking: Literal["tensorboard", "none"] = "none"
    """tensorboard: the server writes each round's figures and sample grid to <run dir>/tensorboard/ as they come,
    to watch a run live and compare runs (needs the tensorboard package on the server only)."""

    @field_validator("silo_nodes", mode="before")
    @classmethod
    def _parse_silo_nodes(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        pairs = [p.strip() for p in v.split(",") if p.strip()]
        if any(p.count("=") != 1 for p in pairs):
            raise ValueError(f"silo-nodes must be 'name=node-id' pairs separated by ',', got '{v}'")
        items = [tuple(x.strip() for x in p.split("=")) for p in pairs]
        if any(not node.isdigit() for _, node in items):
            raise ValueError(f"silo-nodes: node ids are integers (from flwr supernode ls), got '{v}'")
        if len({name for name, _ in items}) != len(items):
            raise ValueError(f"silo-nodes binds a silo name twice: '{v}'")
        return {name: int(node) for name, node in items}

    @field_validator("silo_nodes")
    @classmethod
    def _distinct_nodes(cls, v: dict[str, int]) -> dict[str, int]:
        for name, node in v.items():
            check_name(name)
            if not 0 < node < 2**64:
                raise ValueError(f"silo-nodes: node id {node} is out of range")
        if len(set(v.values())) != len(v):
            raise ValueError("silo-nodes binds one node to two silos: give every silo its own SuperNode")
        return v

    @field_serializer("silo_nodes")
    def _silo_nodes_flat(self, v: dict[str, int]) -> str:
        return ",".join(f"{name}={node}" for name, node in v.items())

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_name(cls, v: str) -> str:
        return check_name(v) if v else v

    def resolved_results_dir(self) -> Path:
        return _resolve_against_project(self.results_dir)


class DataSection(Section):
    """Which dataset, and which classes and outliers each silo holds."""

    dataset: str = "mnist"
    """A built-in dataset (mnist, fashion-mnist, elpv, animal-mnist: alignfl_app/data/catalog.py), or folder: every
    silo reads its own ImageFolder (a sub-folder per class)."""
    data_root: str = ""
    """Where the server reads a built-in dataset's test split; ``alignfl run`` also gives it to new simulated
    silos. A silo reads its own (node config data-root, else $ALIGNFL_DATA_ROOT or ~/.cache/alignfl/data)."""
    silo_classes: tuple[tuple[int | str, ...], ...] = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    """Flat form ``"0,1;2,3"``: silo k holds the classes of the k-th ';'-separated group (class ids of the
    built-in datasets; class names, i.e. folder names, for dataset='folder')."""
    silo_names: tuple[str, ...] = ()
    """Flat form ``"hospital-a;hospital-b"`` (';' between silos, as in every per-silo key): the name of each
    group of silo-classes, in order (the only names the server accepts generators under; ``alignfl run`` names
    new simulated silos so); empty: silo-0, silo-1, ... A silo's name is its own: this never renames one."""
    silo_layout: Literal["disjoint", "slices", "by-source"] = "disjoint"
    """disjoint: every class belongs to one silo. slices: a class listed by several silos is split into
    disjoint slices of its records, one per silo (lets 50 silos share 10 classes for scaling runs). by-source:
    silo k holds the records of the dataset's k-th source (elpv: the mono and the poly plant) of its classes."""
    max_per_class: int = Field(default=6000, ge=1, le=1_000_000)
    outlier_dataset: str = "auto"
    """auto (the dataset's partner: mnist <-> fashion-mnist; none for the others), none, or a built-in dataset."""
    outlier_silos: tuple[int, ...] = (0,)
    outliers_per_silo: int = Field(default=600, ge=0, le=100_000)
    silo_data_dirs: tuple[str, ...] = ()
    """dataset='folder' in simulation, flat form ``"dirA;dirB"``: silo k's ImageFolder, given to new simulated silos
    by ``alignfl run`` and read by the offline tools; a running silo reads only its own node config's data-dir."""
    image_size: tuple[int, int] = IMAGE_SHAPE[1:]
    """Flat form ``"32x32"`` (height x width): every image is resized to it."""
    channels: Literal[1, 3] = 1
    test_fraction: float = Field(default=0.2, ge=0, lt=1)
    """A folder silo without a ``test`` sub-folder holds out this share of each class (seeded)."""
    global_test_dir: str = ""
    """dataset='folder': an ImageFolder the server judges the global model on; empty: each silo judges it on its
    own held-out images."""
    server_validation_dir: str = ""
    """dataset='folder': the server's own labelled ImageFolder (any subset of the run's classes) on which it checks
    that every new generator draws its classes recognisably; never the global-test-dir the results are scored on."""
    server_validation_per_class: int = Field(default=100, ge=0, le=10_000)
    """Built-in datasets: records per class of the training split the server keeps to check generators' labels
    (the tail of the seeded order silos take their records from); 0: no label check."""

    @field_validator("silo_classes", mode="before")
    @classmethod
    def _parse_classes(cls, v: Any, info: ValidationInfo) -> Any:
        if not isinstance(v, str):
            return v
        groups = v.split(";")
        if info.data.get("dataset") == "folder":
            return tuple(_class_name_list(g) for g in groups)
        return tuple(_int_list(g) for g in groups)

    @field_validator("silo_classes")
    @classmethod
    def _classes_valid(
        cls, v: tuple[tuple[int | str, ...], ...], info: ValidationInfo
    ) -> tuple[tuple[int | str, ...], ...]:
        if not v or any(not g for g in v):
            raise ValueError("every silo needs at least one class, e.g. '0,1;2,3'")
        if len(v) > MAX_SILOS:
            raise ValueError(f"{len(v)} silos (';'-separated groups); at most {MAX_SILOS} in a run")
        if any(len(g) != len(set(g)) for g in v):
            raise ValueError(f"a silo lists a class twice, got '{_classes_text(v)}'")
        if info.data.get("dataset") == "folder":
            if any(not isinstance(c, str) for g in v for c in g):
                raise ValueError("dataset='folder' takes class names (the class folders' names), e.g. 'cat,dog;owl'")
            if len({c for g in v for c in g}) > MAX_CLASSES:
                raise ValueError(f"at most {MAX_CLASSES} classes in a run (the global classifier's outputs)")
        else:
            top = NUM_CLASSES.get(str(info.data.get("dataset")), 10) - 1
            if any(not isinstance(c, int) or c < 0 or c > top for g in v for c in g):
                raise ValueError(f"classes must be in 0..{top}, got '{_classes_text(v)}'")
        return v

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        if v != "folder" and v not in CATALOG:
            raise ValueError(f"unknown dataset '{v}': use one of {[*CATALOG, 'folder']}")
        return v

    @field_validator("outlier_dataset")
    @classmethod
    def _known_outlier_dataset(cls, v: str) -> str:
        if v not in ("auto", "none") and v not in CATALOG:
            raise ValueError(f"unknown outlier-dataset '{v}': use auto, none or one of {list(CATALOG)}")
        return v

    @field_validator("silo_names", mode="before")
    @classmethod
    def _parse_names(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        if "," in v and ";" not in v:
            warnings.warn(
                "silo-names separated by ',' is deprecated: separate them with ';' like the other per-silo keys",
                FutureWarning,
                stacklevel=2,
            )
            v = v.replace(",", ";")
        return tuple(n.strip() for n in v.split(";") if n.strip())

    @field_validator("silo_names")
    @classmethod
    def _names_are_names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            check_name(name)
        if len({n.lower() for n in v}) != len(v):
            raise ValueError("silo-names must be distinct (also ignoring case)")
        return v

    @field_validator("outlier_silos", mode="before")
    @classmethod
    def _parse_outlier_silos(cls, v: Any) -> Any:
        return _int_list(v) if isinstance(v, str) else v

    @field_validator("silo_data_dirs", mode="before")
    @classmethod
    def _parse_dirs(cls, v: Any) -> Any:
        return tuple(d.strip() for d in v.split(";") if d.strip()) if isinstance(v, str) else v

    @field_validator("image_size", mode="before")
    @classmethod
    def _parse_size(cls, v: Any) -> Any:
        return parse_image_size(v) if isinstance(v, str) else v

    @field_serializer("silo_classes")
    def _classes_flat(self, v: tuple[tuple[int | str, ...], ...]) -> str:
        return _classes_text(v)

    @field_serializer("silo_names")
    def _names_flat(self, v: tuple[str, ...]) -> str:
        return ";".join(v)

    @field_serializer("outlier_silos")
    def _outlier_silos_flat(self, v: tuple[int, ...]) -> str:
        return ",".join(map(str, v))

    @field_serializer("silo_data_dirs")
    def _dirs_flat(self, v: tuple[str, ...]) -> str:
        return ";".join(v)

    @field_serializer("image_size")
    def _size_flat(self, v: tuple[int, int]) -> str:
        return f"{v[0]}x{v[1]}"

    @model_validator(mode="after")
    def _consistent(self) -> DataSection:
        n = self.num_silos
        flat = [c for g in self.silo_classes for c in g]
        if self.is_folder:
            self._check_folder_keys()
        else:
            if self.silo_data_dirs or self.global_test_dir or self.server_validation_dir:
                raise ValueError(
                    "silo-data-dirs, global-test-dir and server-validation-dir apply to dataset='folder' only: "
                    "clear them"
                )
            if self.silo_layout == "by-source":
                self._check_sources()
            elif self.silo_layout == "disjoint" and len(flat) != len(set(flat)):
                raise ValueError(
                    f"silo-classes: classes must be disjoint across silos, got '{_classes_text(self.silo_classes)}' "
                    "(or set silo-layout='slices' to split a shared class's records between its silos)"
                )
        if not self.is_folder:
            top = NUM_CLASSES[self.dataset] - 1
            if any(not isinstance(c, int) or not 0 <= c <= top for c in flat):
                raise ValueError(
                    f"silo-classes: classes must be in 0..{top} for {self.dataset}, got "
                    f"'{_classes_text(self.silo_classes)}'"
                )
        if self.silo_names and len(self.silo_names) != n:
            raise ValueError(
                f"silo-names names {len(self.silo_names)} silos but silo-classes has {n} groups: give "
                "one name per group, separated by ';'"
            )
        bad = [s for s in self.outlier_silos if s < 0 or s >= n]
        if bad:
            raise ValueError(f"outlier-silos {bad} out of range for {n} silos (0..{n - 1})")
        if self.outlier_source == self.dataset:
            raise ValueError("outlier-dataset must differ from dataset (or be 'auto'/'none')")
        return self

    def _check_sources(self) -> None:
        sources = CATALOG[self.dataset].sources
        if not sources:
            raise ValueError(f"silo-layout='by-source' needs a dataset with sources (elpv); {self.dataset} has none")
        if self.num_silos != len(sources):
            raise ValueError(
                f"silo-layout='by-source': {self.dataset} has {len(sources)} sources {list(sources)}, so silo-classes "
                f"needs {len(sources)} groups (one silo per source), got {self.num_silos}"
            )

    def _check_folder_keys(self) -> None:
        if self.server_validation_dir and self.global_test_dir:
            same = _resolve_against_project(self.server_validation_dir) == _resolve_against_project(
                self.global_test_dir
            )
            if same:
                raise ValueError(
                    "server-validation-dir is the global-test-dir: generators would be judged on the images the "
                    "results are scored on; give the server a separate labelled folder"
                )
        if self.silo_data_dirs and len(self.silo_data_dirs) != self.num_silos:
            raise ValueError(
                f"silo-data-dirs names {len(self.silo_data_dirs)} folders for the {self.num_silos} "
                "silos of silo-classes: give one folder per silo, separated by ';'"
            )
        if self.outlier_dataset not in ("auto", "none"):
            raise ValueError(
                "outliers come from the built-in datasets: set outlier-dataset='none' (or 'auto') with dataset='folder'"
            )

    @property
    def is_folder(self) -> bool:
        return self.dataset == "folder"

    @property
    def num_silos(self) -> int:
        return len(self.silo_classes)

    @property
    def names(self) -> tuple[str, ...]:
        """Every silo's name, in the order of silo-classes."""
        return self.silo_names or tuple(f"silo-{i}" for i in range(self.num_silos))

    def assigned_classes(self) -> dict[str, frozenset[str]]:
        """silo name -> the class names the run assigned to it (what its descriptor must declare)."""
        names = self.class_names
        return {silo: frozenset(names[c] for c in self.silo_class_ids(i)) for i, silo in enumerate(self.names)}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The run's label space, fixed by configuration: class id i is ``class_names[i]`` (descriptors carry
        names, never ids). Built-in datasets: their own order; folders: the sorted union of silo-classes."""
        if self.is_folder:
            return tuple(sorted({str(c) for g in self.silo_classes for c in g}))
        return CLASS_NAMES[self.dataset]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width): what every image is converted to, and what every model takes."""
        return (self.channels, *self.image_size)

    def class_ids(self, classes: tuple[int | str, ...]) -> tuple[int, ...]:
        """A silo's declared classes (ids of a built-in dataset, names of a folder dataset) as ids of the run's
        label space; ConfigError names a class outside it."""
        if not self.is_folder:
            try:
                ids = tuple(int(c) for c in classes)
            except ValueError:
                ids = ()
            if not ids or any(not 0 <= c < self.num_classes for c in ids):
                raise ConfigError(
                    f"classes {list(classes)} must be class ids 0..{self.num_classes - 1} of "
                    f"{self.dataset}: fix the node config's classes"
                )
            return ids
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = [str(c) for c in classes if str(c) not in index]
        if unknown:
            raise ConfigError(
                f"class '{unknown[0]}' is not in the run's label space {list(self.class_names)} "
                "(the names of silo-classes): fix the node config's classes or the run's silo-classes"
            )
        return tuple(index[str(c)] for c in classes)

    def silo_class_ids(self, silo: int) -> tuple[int, ...]:
        """Silo ``silo``'s classes of silo-classes, as ids of the run's label space."""
        return self.class_ids(self.silo_classes[silo])

    @property
    def outlier_source(self) -> str | None:
        """The dataset outliers are drawn from, or None when outliers are off (always for folder datasets)."""
        if self.outlier_dataset == "none" or self.outliers_per_silo == 0 or not self.outlier_silos:
            return None
        if self.outlier_dataset == "auto":
            return None if self.is_folder else CATALOG[self.dataset].outlier_partner
        return self.outlier_dataset

    def resolved_data_root(self) -> Path:
        return resolve_data_root(self.data_root)

    def resolved_silo_data_dir(self, silo: int, project_dir: Path | None = None) -> Path | None:
        """Silo ``silo``'s folder from silo-data-dirs (relative paths resolve like results-dir), or None."""
        if silo >= len(self.silo_data_dirs):
            return None
        return _resolve_against_project(self.silo_data_dirs[silo], project_dir)

    def resolved_global_test_dir(self) -> Path | None:
        return _resolve_against_project(self.global_test_dir) if self.global_test_dir else None

    def resolved_server_validation_dir(self) -> Path | None:
        return _resolve_against_project(self.server_validation_dir) if self.server_validation_dir else None


def _classes_text(groups: tuple[tuple[int | str, ...], ...]) -> str:
    return ";".join(",".join(map(str, g)) for g in groups)


class LocalTrainingSection(Section):
    """A silo's local training: its architecture and the optimiser settings of its VAE."""

    silo_architectures: tuple[str, ...] = ("mlp", "conv")
    """Flat form ``"mlp;conv"``: cycled over silos; names of conf/architectures/<name>.toml."""
    conditional: bool = True
    generator_layout: Literal["conditional", "per-class"] = "conditional"
    """conditional: one decoder for the silo's classes, the class as input. per-class: one unconditional VAE per
    class, trained on that class's records only (every sample carries the class it was trained on)."""
    local_epochs: int = Field(default=10, ge=1, le=1000)
    local_min_steps: int = Field(default=200, ge=0, le=100_000)
    """A VAE's local training takes at least this many optimizer steps a round (more passes for a small silo:
    a few hundred images x a few epochs is too few steps for a conv decoder); 0: exactly local-epochs."""
    batch_size: int = Field(default=128, ge=1, le=16_384)
    learning_rate: float = Field(default=1e-3, gt=0)
    kl_weight: float = Field(default=1.0, ge=0)
    latent_fit: Literal["gaussian", "mixture", "none"] = "gaussian"
    """gaussian: the released decoder samples a Gaussian fitted to its VAE's latent codes of the silo's records,
    folded into its first layer; mixture: a Gaussian mixture of ``latent_components`` fitted to them, in a layer
    in front of the decoder; none: N(0, I). A fit is a statistic of the records: made only without DP."""
    latent_components: int = Field(default=10, ge=2, le=MAX_LATENT_COMPONENTS)
    """Components per class of the ``mixture`` fit."""
    label_fidelity_samples: int = Field(default=0, ge=0, le=100_000)
    """>0: each round the silo draws this many samples from its released decoder (as the server draws them) and
    reports the share a classifier trained on its own records assigns to the intended class; 0: not measured.
    Never under DP (a figure of the records)."""
    client_threads: int = Field(default=1, ge=1, le=256)
    client_device: DeviceChoice = "auto"
    """Where silos train (a silo's node config may override it)."""

    @field_validator("silo_architectures", mode="before")
    @classmethod
    def _parse_architectures(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = tuple(a.strip() for a in v.split(";") if a.strip())
        if not v:
            raise ValueError("silo-architectures needs at least one architecture name, e.g. 'mlp;conv'")
        return v

    @field_validator("silo_architectures")
    @classmethod
    def _names_not_paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            check_name(name)
        return v

    @field_serializer("silo_architectures")
    def _architectures_flat(self, v: tuple[str, ...]) -> str:
        return ";".join(v)

    def architecture_for(self, silo: int) -> str:
        return self.silo_architectures[silo % len(self.silo_architectures)]


MAX_DP_STEPS = 10_000  # per run: the PRV accountant of a longer plan takes minutes and gigabytes


class PrivacySection(Section):
    """What the run asks of the silos' privacy (each silo's own policy may refuse), the DP-SGD recipe, and the
    silo-side audit.

    DP-SGD draws Poisson batches at the public rate ``dp-sample-rate`` for ``dp-steps`` steps a round, so the
    epsilon a silo spends depends on public constants only (never on how many records it holds).
    """

    epsilon: float = Field(default=0.0, ge=0, alias="dp-epsilon")
    """Target epsilon of the whole planned run, per silo; 0: no DP unless dp-noise-multiplier."""
    noise_multiplier: float = Field(default=0.0, ge=0, alias="dp-noise-multiplier")
    delta: float = Field(default=1e-5, gt=0, lt=1, alias="dp-delta")
    sample_rate: float = Field(default=0.05, gt=0, le=1, alias="dp-sample-rate")
    steps: int = Field(default=300, ge=1, le=MAX_DP_STEPS, alias="dp-steps")
    """DP-SGD steps per round (per generator group: per class with generator-layout='per-class')."""
    learning_rate: float = Field(default=2e-3, gt=0, alias="dp-learning-rate")
    clip_init: float = Field(default=1.0, gt=0, alias="dp-clip-init")
    clip_quantile: float = Field(default=0.5, gt=0, lt=1, alias="dp-clip-quantile")
    clip_lr: float = Field(default=0.2, ge=0, alias="dp-clip-lr")
    unclipped_std: float = Field(default=0.0, ge=0, alias="dp-unclipped-std")
    """Noise std of the unclipped count; 0: expected batch / 20."""
    count_noise_std: float = Field(default=10.0, gt=0, alias="dp-count-noise-std")
    """Noise std of each group's record count (released once per run to the silo's own DP-SGD, booked)."""
    accountant: Literal["prv", "rdp"] = Field(default="prv", alias="dp-accountant")
    secure_noise: bool = Field(default=False, alias="dp-secure-noise")
    """true: every DP draw comes from the OS's cryptographic generator (slower); false: a fast generator
    seeded from it."""
    audit: bool = True
    audit_samples: int = Field(default=2000, ge=1, le=100_000)

    @model_validator(mode="after")
    def _one_calibration(self) -> PrivacySection:
        if self.epsilon > 0 and self.noise_multiplier > 0:
            raise ValueError("set either dp-epsilon (calibrate the noise) or dp-noise-multiplier, not both")
        return self

    @property
    def enabled(self) -> bool:
        return self.epsilon > 0 or self.noise_multiplier > 0


class LipschitzSection(Section):
    """Lipschitz control of the shared decoders (data-free, so it composes with DP)."""

    method: Literal["none", "gp", "gp-one-sided", "spectral"] = Field(default="none", alias="lipschitz")
    weight: float = Field(default=0.0, ge=0, alias="lipschitz-weight")
    target: float = Field(default=1.0, gt=0, alias="lipschitz-target")

    @model_validator(mode="after")
    def _weighted(self) -> LipschitzSection:
        if self.method in ("gp", "gp-one-sided") and self.weight == 0:
            raise ValueError(f"lipschitz='{self.method}' needs lipschitz-weight > 0 (e.g. 0.1), or lipschitz='none'")
        return self


class FeaturesSection(Section):
    """The space the global classifier reads, shared by silos and server (alignfl_app/models/features.py)."""

    space: Literal["pixels", "scattering"] = Field(default="pixels", alias="feature-space")
    """pixels: the classifier reads images. scattering: it reads a fixed wavelet scattering of them; pixel
    generators' samples go through the same transform, and the gaussian family generates features directly."""
    scales: int = Field(default=3, ge=1, le=6, alias="scattering-scales")
    angles: int = Field(default=8, ge=2, le=16, alias="scattering-angles")
    pool: int = Field(default=1, ge=1, le=4, alias="scattering-pool")

    @property
    def spec(self):  # -> FeatureSpec (models/features.py imports torch; config does not)
        from alignfl_app.models.features import FeatureSpec

        return FeatureSpec(space=self.space, scales=self.scales, angles=self.angles, pool=self.pool)


class ServerSection(Section):
    """What the server learns from the stored generators, and how."""

    global_model: Literal["classifier", "vae"] = "classifier"
    synthetic_per_silo: int = Field(default=2000, ge=1, le=100_000)
    synthetic_total: int = Field(default=0, ge=0, le=1_000_000)
    """>0: this many samples per server epoch in all, split evenly over the classes the stored generators hold,
    then over each class's silos (server time no longer grows with the silos); 0: synthetic-per-silo each."""
    sample_temperature: float = Field(default=1.0, gt=0)
    sample_sharpness: float = Field(default=3.0, ge=1)
    """Pixel logits are multiplied by it before the sigmoid: 1 = the decoder's mean image (the Bernoulli
    likelihood's average, blurred); larger values move every pixel towards its more likely value."""
    epochs: int = Field(default=5, ge=0, le=1000, alias="server-epochs")
    batch_size: int = Field(default=128, ge=1, le=16_384, alias="server-batch-size")
    learning_rate: float = Field(default=1e-3, gt=0, alias="server-learning-rate")
    label_smoothing: float = Field(default=0.1, ge=0, lt=1, alias="server-label-smoothing")
    """Share of each synthetic sample's target spread over all classes when the global classifier learns."""
    threads: int = Field(default=2, ge=1, le=256, alias="server-threads")
    device: DeviceChoice = Field(default="auto", alias="server-device")
    """Where the server samples the generators and trains and evaluates the global model."""
    max_decoder_mb: float = Field(default=64.0, gt=0, le=2048)
    max_sampling_mb: float = Field(default=1024.0, gt=0, le=65_536)
    """The server's memory for drawing one chunk of samples from one decoder (its activations and its kernels'
    workspaces, computed from the descriptor before anything is built); a decoder that cannot draw a chunk of 64
    within it is refused."""
    max_sample_mflops: float = Field(default=1000.0, gt=0, le=1_000_000)
    """The server's compute for drawing one sample from one decoder, in millions of floating-point operations
    (counted from the descriptor on the meta device before anything is built); a costlier decoder is refused. The
    shipped architectures need at most about 230 (conv-deep at 128x128)."""
    sample_grid_per_silo: int = Field(default=10, ge=0, le=64)
    judge_samples_per_class: int = Field(default=32, ge=0, le=1024)
    """Samples per class the server draws from every new generator to judge it (0: no collapse check)."""
    judge_min_spread: float = Field(default=0.01, ge=0, le=1)
    """A class whose samples spread less (the mean over pixels or features of their standard deviation; pixels
    and log-scattering features have fixed scales) is collapsed and the generator is refused."""
    judge_min_recognition: float = Field(default=1.0, ge=0, le=100)
    """With labelled server data (server-validation-per-class, server-validation-dir): a linear probe fitted to the
    server's images must recognise each class a new generator draws in its samples at least this many times as
    often as chance (1 / the number of classes it has images of), else the generator is refused."""
    judge_max_harm: float = Field(default=0.2, ge=0, le=1)
    """With labelled server data: a new generator whose samples lower the probe's accuracy on one of the other
    silos' classes by more than the server's own images of its classes would (leave-one-out), by more than this,
    gets its silo quarantined."""
    augment: tuple[Literal["affine", "crop", "blur", "noise"], ...] = Field(
        default=("affine", "crop"), alias="server-augment"
    )
    """Random transforms of every synthetic batch, in order, flat form ``"affine,crop"`` (empty: none): affine
    (rotate, shift, scale), crop (pad 2, crop), blur (Gaussian, sigma up to 1 pixel), noise (Gaussian, std 0.2).
    Free of privacy cost: they act on samples, not on records."""

    @field_validator("augment", mode="before")
    @classmethod
    def _parse_augment(cls, v: Any) -> Any:
        return tuple(a.strip() for a in v.split(",") if a.strip()) if isinstance(v, str) else v

    @field_serializer("augment")
    def _augment_flat(self, v: tuple[str, ...]) -> str:
        return ",".join(v)


class BaselinesSection(Section):
    """The methods ALIGN-FL is compared with."""

    strategy: Literal["alignfl", "fedavg", "fedprox"] = "alignfl"
    """alignfl: decoders only, server learns from samples. fedavg/fedprox: Flower's built-in weight averaging
    of the global model, trained by the silos on their real data (local-epochs, batch-size, learning-rate)."""
    proximal_mu: float = Field(default=0.01, ge=0)
    reference_epochs: int = Field(default=10, ge=1, le=1000)


class RunConfig(BaseModel):
    """The run config of ``[tool.flwr.app.config]``: flat keys in, typed sections out (``flat()`` goes back)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    SECTIONS: ClassVar[dict[str, type[Section]]] = {
        "run": RunSection,
        "data": DataSection,
        "local": LocalTrainingSection,
        "privacy": PrivacySection,
        "lipschitz": LipschitzSection,
        "features": FeaturesSection,
        "server": ServerSection,
        "baselines": BaselinesSection,
    }

    run: RunSection = RunSection()
    data: DataSection = DataSection()
    local: LocalTrainingSection = LocalTrainingSection()
    privacy: PrivacySection = PrivacySection()
    lipschitz: LipschitzSection = LipschitzSection()
    features: FeaturesSection = FeaturesSection()
    server: ServerSection = ServerSection()
    baselines: BaselinesSection = BaselinesSection()

    @model_validator(mode="before")
    @classmethod
    def _sections_from_flat_keys(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or set(raw) <= set(cls.SECTIONS):
            return raw
        owner = {
            field.alias or name: section
            for section, model in cls.SECTIONS.items()
            for name, field in model.model_fields.items()
        }
        unknown = sorted(k for k in raw if k not in owner)
        if unknown:
            raise ValueError(f"unknown key '{unknown[0]}': use the keys of [tool.flwr.app.config] in pyproject.toml")
        grouped: dict[str, dict[str, Any]] = {s: {} for s in cls.SECTIONS}
        for key, value in raw.items():
            grouped[owner[key]][key] = value
        return grouped

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        strategy = self.baselines.strategy
        if strategy != "alignfl" and self.privacy.enabled:
            raise ValueError(
                f"DP applies to ALIGN-FL's silos only; strategy='{strategy}' trains without it: "
                "set dp-epsilon=0 and dp-noise-multiplier=0"
            )
        if strategy != "alignfl" and self.lipschitz.method != "none":
            raise ValueError(
                f"lipschitz applies to ALIGN-FL's silo decoders only: set lipschitz='none' for strategy='{strategy}'"
            )
        if self.features.space != "pixels":
            if self.server.global_model != "classifier":
                raise ValueError(
                    f"feature-space='{self.features.space}' feeds a classifier: set global-model="
                    "'classifier' or feature-space='pixels'"
                )
            try:
                self.features.spec.check_fits(self.data.image_shape)
            except ValueError as exc:
                raise ValueError(str(exc)) from None
        if not self.local.conditional and self.local.generator_layout == "per-class":
            raise ValueError("generator-layout='per-class' labels every sample by its class: set conditional=true")
        if not self.local.conditional and self.server.global_model == "classifier":
            raise ValueError(
                "an unconditional decoder yields unlabelled samples: set global-model='vae' or conditional=true"
            )
        from alignfl_app.models.families import check_family_fits_run  # the families import this module

        for name in dict.fromkeys(self.local.silo_architectures):
            spec = load_architecture(name)
            spec.check_fits(self.data.image_shape)
            check_family_fits_run(spec, self)
        if self.run.resume and not self.run.run_name:
            raise ValueError("resume=true needs the run-name of the run to continue, e.g. run-name='study-1'")
        unknown = [name for name in self.run.silo_nodes if name not in self.data.names]
        if unknown:
            raise ValueError(
                f"silo-nodes names '{unknown[0]}', which is not one of the run's silo-names {list(self.data.names)}"
            )
        if self.run.min_silos > self.data.num_silos:
            raise ValueError(f"min-silos={self.run.min_silos} exceeds the {self.data.num_silos} silos of silo-classes")
        if self.run.resume and strategy != "alignfl":
            raise ValueError(f"resume=true is supported for strategy='alignfl' only, not '{strategy}'")
        planned = self.run.num_server_rounds * self.privacy.steps
        if self.privacy.enabled and planned > MAX_DP_STEPS:
            raise ValueError(
                f"num-server-rounds x dp-steps = {planned} DP-SGD steps; at most {MAX_DP_STEPS} per run "
                "(the silos' accountant must stay fast): lower them or raise dp-sample-rate"
            )
        return self

    @property
    def required_silos(self) -> int:
        """How many silos must be connected at the start: min-silos, or every configured silo."""
        return self.run.min_silos or self.data.num_silos

    def flat(self) -> dict[str, Any]:
        """The flat, hyphenated run config (what Flower passes, what summaries and checkpoints record)."""
        out: dict[str, Any] = {}
        for section in self.SECTIONS:
            out.update(getattr(self, section).model_dump(by_alias=True))
        return out


def parse_run_config(raw: dict[str, Any]) -> RunConfig:
    """Validate Flower's flat run config; raise ConfigError with a one-line message."""
    try:
        return RunConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(one_line(exc, "run config") + " (fix it in [tool.flwr.app.config] or --run-config)") from exc


def silos_root() -> Path:
    """Where simulated silos keep what they own: $ALIGNFL_SILOS_ROOT, else ~/.cache/alignfl/silos."""
    return machine_dir("ALIGNFL_SILOS_ROOT", "silos")


class SiloNodeConfig(BaseModel):
    """What a SuperNode may override for its own silo (deployment): ``--node-config 'k=v ...'``.

    Unknown keys are errors: a misspelt ``data_root`` on a silo's machine must not silently fall
    back to the run's data root.
    """

    model_config = ConfigDict(
        extra="forbid", alias_generator=_dashed, populate_by_name=True, frozen=True, allow_inf_nan=False
    )

    partition_id: int = Field(ge=0, lt=MAX_SILOS)
    num_partitions: int | None = Field(default=None, ge=1, le=MAX_SILOS)
    architecture: str | None = Field(default=None, pattern=NAME_PATTERN)
    data_root: str | None = None
    silo_name: str | None = Field(default=None, pattern=NAME_PATTERN)
    classes: tuple[int | str, ...] | None = None
    """The classes this silo holds (flat form '3,4': class ids of a built-in dataset, class names of a folder
    dataset); default: group ``partition-id`` of the run's silo-classes."""
    data_dir: str | None = None
    """dataset='folder': this silo's ImageFolder (a sub-folder per class, optionally a ``test`` sub-folder)."""
    client_device: DeviceChoice | None = None
    """Where this silo trains; default: the run's client-device."""
    silo_dir: str | None = None
    """The one folder where this silo keeps what it owns (privacy policy and ledger, reports, state); default
    <silos root>/<silo name>."""

    @field_validator("data_root", "data_dir", "silo_dir")
    @classmethod
    def _printable_path(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(ord(ch) < 32 for ch in v)):
            raise ValueError("a folder path must be non-empty and printable (no control characters)")
        return v

    @field_validator("classes", mode="before")
    @classmethod
    def _parse_classes(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        labels = tuple(int(c) if c.isdigit() else c for c in _class_name_list(v))
        if not labels or len(labels) != len(set(labels)):
            raise ValueError(f"classes must be distinct class ids or names separated by ',', e.g. '3,4'; got '{v}'")
        return labels

    @field_serializer("classes")
    def _classes_flat(self, v: tuple[int | str, ...] | None) -> str | None:
        return None if v is None else ",".join(map(str, v))

    @property
    def name(self) -> str:
        """The silo's name: ``silo-name``, else ``silo-<partition-id>``."""
        return self.silo_name or f"silo-{self.partition_id}"

    def resolved_silo_dir(self) -> Path:
        return Path(self.silo_dir).expanduser() if self.silo_dir else silos_root() / self.name

    def resolved_data_dir(self) -> Path | None:
        return Path(self.data_dir).expanduser() if self.data_dir else None


def parse_node_config(raw: dict[str, Any]) -> SiloNodeConfig:
    try:
        return SiloNodeConfig.model_validate(dict(raw))
    except ValidationError as exc:
        raise ConfigError(
            one_line(exc, "node config") + " (set it with flower-supernode --node-config 'partition-id=0 ...')"
        ) from exc
