"""Every setting of the service, in one class, read from `STT_*` environment variables."""

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LARGE_MODEL_PARAMETERS = 50_000_000  # from here on one CPU worker serves best (`cpu_worker_count`)
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "model_store" / "w2v2-bert-commands-en"


_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}$"


class ModelEntry(BaseModel):
    """One model of `STT_MODELS`: where it is, the name clients pick it by, and (optionally)
    its own devices and CPU workers/threads instead of its share by the split rule
    (`Settings.split_for`)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=512, description="Folder or hub id.")
    name: str | None = Field(
        None, pattern=_NAME_PATTERN, description="Served name (default: folder name or id)."
    )
    aliases: list[Annotated[str, Field(pattern=_NAME_PATTERN)]] = Field(
        default_factory=list, max_length=64, description="Other accepted names."
    )
    language: str | None = Field(
        None, max_length=16, description="As `STT_LANGUAGE`, for this model."
    )
    device: str | None = Field(None, description="As `STT_DEVICE`, for this model.")
    cpu_workers: int | None = Field(None, ge=1, le=64, description="CPU workers of this model.")
    cpu_threads: int | None = Field(
        None, ge=1, le=256, description="torch threads per CPU worker of this model."
    )

    @property
    def served_name(self) -> str:
        if self.name:
            return self.name
        path = Path(self.model).expanduser()
        return path.name if path.is_dir() else self.model


def parse_models(value: str) -> list[dict[str, object]]:
    """`STT_MODELS` text → entries. Either a JSON list of objects (every `ModelEntry` field),
    or the short form: comma-separated `name=folder-or-id` or bare `folder-or-id` items
    (`tiny=model_store/tiny,whisper=openai/whisper-tiny`)."""
    text = value.strip()
    if text.startswith("["):
        loaded = json.loads(text)
        if not isinstance(loaded, list):
            raise ValueError("STT_MODELS as JSON must be a list of objects")
        return loaded
    entries: list[dict[str, object]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, source = item.partition("=")
        if sep and not name.strip():
            raise ValueError(f"{item!r}: the name before '=' is empty")
        if sep and not source.strip():
            raise ValueError(f"{item!r}: the folder or id after '=' is empty")
        entries.append({"name": name.strip(), "model": source.strip()} if sep else {"model": item})
    return entries


class Settings(BaseSettings):
    """Service settings. Each field is an environment variable `STT_<NAME>` (e.g. `STT_PORT`)."""

    model_config = SettingsConfigDict(env_prefix="STT_", extra="forbid")

    # --- model ---
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Checkpoint folder to serve.")
    model: str | None = Field(
        None,
        max_length=512,
        description="Checkpoint folder or hub id (org/name) found in the local Hugging Face "
        "cache, never downloaded; overrides `model_dir`.",
    )
    model_name: str | None = Field(
        None, description="Name clients pass as `model` (default: the folder's name or the id)."
    )
    model_aliases: list[str] = Field(
        default_factory=list, description="Other accepted `model` names, e.g. whisper-1."
    )
    models: Annotated[list[ModelEntry], NoDecode] = Field(
        default_factory=list,
        max_length=64,
        description="Several models in one server: `name=folder-or-id,name2=...` (or bare "
        "folders/ids, or a JSON list of {model, name, aliases, language, device, cpu_workers, "
        "cpu_threads}); the first is the default. Exclusive with model/model_dir/model_name.",
    )
    language: str = Field(
        "en", max_length=16, description="Language reported for a model without language tokens."
    )
    device: str = Field(
        "auto",
        description="`auto` (each CUDA device, else one CPU worker), `cpu`, `cuda:0,cuda:1`.",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="`auto`: float16 on CUDA, float32 on CPU."
    )
    cpu_workers: int = Field(
        0, ge=0, le=64, description="CPU workers (model replicas); 0: by model size."
    )
    cpu_threads: int = Field(
        0, ge=0, le=256, description="torch threads per CPU worker; 0: cores / workers."
    )
    warmup: bool = Field(
        True,
        description="Run one generate (and every compiled input shape) before reporting ready.",
    )

    # --- fast paths (service/engine/fastpath.py; README "Fast paths") ---
    compile: Literal["off", "encoder", "all"] = Field(
        "off",
        description="torch.compile the `encoder`, or `all` (encoder and decoder module); off "
        "by default: see the README's fast paths for what it costs at start-up and gains.",
    )
    compile_cache_dir: Path | None = Field(
        None,
        description="Compile cache folder (TORCHINDUCTOR_CACHE_DIR), kept across restarts; "
        "empty: torch's default under /tmp.",
    )
    quantize: Literal["off", "int8"] = Field(
        "off",
        description="`int8`: the encoder's linear layers in int8 (torchao, the `int8` extra); "
        "changes transcripts a little.",
    )

    # --- batching and queueing ---
    batching: Literal["continuous", "static"] = Field(
        "static",
        description="`continuous`: the engine's own loop, one decoder step at a time, rows "
        "joining and leaving between steps; `static`: each batch is one `generate` call.",
    )
    join_per_step: int = Field(
        4,
        ge=1,
        le=256,
        description="Continuous batching: most newcomers encoded between two decoder steps "
        "(bounds the stall a running row suffers to that many encodes).",
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="Most requests in one batch.")
    max_wait_ms: float = Field(
        5.0, ge=0, le=1000, description="How long a batch's first request waits for company."
    )
    max_batch_audio_seconds: float = Field(
        240.0, gt=0, le=3600, description="Padded audio seconds per batch (size x longest clip)."
    )
    max_queue_size: int = Field(256, ge=1, le=100_000, description="Most requests waiting.")
    max_queued_audio_seconds: float = Field(
        3600.0, gt=0, description="Most audio seconds waiting in the queue."
    )

    max_inflight_audio_seconds: float = Field(
        7200.0,
        gt=0,
        le=1_000_000,
        description="Decoded seconds of upload audio held by accepted requests at once (429 "
        "beyond; one upload is admitted alone whatever its length). 64 KB a second at 16 kHz.",
    )

    # --- request limits ---
    request_timeout_s: float = Field(60.0, gt=0, le=3600, description="Default deadline.")
    max_request_timeout_s: float = Field(
        300.0, gt=0, le=86_400, description="Cap on a request's own `timeout` field."
    )
    max_upload_bytes: int = Field(
        25 * 1024 * 1024, gt=0, description="Upload size limit (413 while reading)."
    )
    max_audio_seconds: float = Field(
        3600.0, gt=0, le=86_400, description="Audio duration limit per request (413)."
    )
    max_window_seconds: float = Field(
        20.0,
        ge=1,
        le=120,
        description="Longer audio is cut at pauses into windows of at most this many seconds.",
    )
    max_channels: int = Field(2, ge=1, le=64, description="Most channels an upload may have.")
    max_new_tokens: int = Field(
        256, ge=1, le=4096, description="Cap on tokens generated per request."
    )
    max_num_beams: int = Field(8, ge=1, le=64, description="Cap on beam width.")
    max_prompt_chars: int = Field(2000, ge=0, description="Cap on the `prompt` field.")

    # --- transport (HTTP/1.1, service/api/transport.py) ---
    max_header_bytes: int = Field(
        32 * 1024,
        ge=4096,
        le=1024 * 1024,
        description="Request line plus headers, in bytes (431 beyond; a target over 8000: 414).",
    )
    max_headers: int = Field(100, ge=16, le=10_000, description="Request headers (431 beyond).")
    header_timeout_s: float = Field(
        10.0, gt=0, le=600, description="A request's headers must arrive within this (408)."
    )
    body_read_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="Longest pause inside a request body (408)."
    )

    # --- streaming (websocket sessions) ---
    max_streams: int = Field(
        32, ge=1, le=10_000, description="Concurrent websocket sessions (more: close 1013)."
    )
    max_streams_per_client: int = Field(
        8,
        ge=1,
        le=10_000,
        description="Concurrent sessions per client (its API key, else its address; more: 1013).",
    )
    stream_config_timeout_s: float = Field(
        10.0, gt=0, le=600, description="Close a session not configured within this time."
    )
    stream_idle_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Close a session that sends no audio for this long (bad messages: no audio).",
    )
    max_stream_seconds: float = Field(
        3600.0, gt=0, le=86_400, description="Longest a session may last (wall clock)."
    )
    max_frame_bytes: int = Field(
        1024 * 1024, ge=1024, le=64 * 1024 * 1024, description="Largest websocket message."
    )
    stream_vad: Literal["energy", "silero"] = Field(
        "energy", description="Default voice-activity detector of /v1/audio/stream sessions."
    )
    realtime_vad: Literal["energy", "silero"] = Field(
        "silero", description="Voice-activity detector of the Realtime `server_vad`."
    )
    long_audio_vad: Literal["energy", "silero"] = Field(
        "energy", description="Detector that finds speech when cutting long uploads into windows."
    )
    realtime_max_event_bytes: int = Field(
        15 * 1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Largest Realtime client event (OpenAI documents 15 MiB per append).",
    )
    realtime_partial_interval_ms: int = Field(
        250,
        ge=100,
        le=10_000,
        description="Realtime sessions re-transcribe open speech this often (for deltas).",
    )
    realtime_max_buffer_seconds: float = Field(
        60.0,
        ge=2,
        le=600,
        description="Most audio an uncommitted Realtime input buffer may hold (manual mode).",
    )

    # --- access ---
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API keys (comma-separated); empty: no key needed. Plus `api_keys_file`.",
    )
    api_keys_file: Path | None = Field(
        None, description="File with one API key per line (`#` comments), e.g. a mounted secret."
    )
    public_metrics: bool = Field(
        False, description="Serve `/metrics` without a key even when keys are set."
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated); empty: off."
    )

    # --- server ---
    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of every logger."
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object per log line (request log included)."
    )
    log_transcripts: bool = Field(
        False, description="Put transcript text in the request log (off: no user content)."
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, le=3600, description="On shutdown, how long queued work may finish."
    )

    @field_validator("model_dir")
    @classmethod
    def _model_dir_exists(cls, value: Path) -> Path:
        if not value.is_dir():
            raise ValueError(f"model_dir {value} is not a folder (set STT_MODEL_DIR)")
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _models_text(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_models(value)
        return value

    @model_validator(mode="after")
    def _models_alone(self) -> "Settings":
        if not self.models:
            return self
        clash = sorted({"model", "model_dir", "model_name"} & self.model_fields_set)
        if clash:
            raise ValueError(
                f"models lists every served model; {', '.join(clash)} cannot be set with it "
                "(put that model first in models to make it the default)"
            )
        seen: dict[str, int] = {}
        for index, entry in enumerate(self.models):
            names = [entry.served_name, *entry.aliases]
            if index == 0:
                names += self.model_aliases  # STT_MODEL_ALIASES name the default model
            for name in names:
                if name in seen:
                    raise ValueError(f"models: the name {name!r} is used twice")
                seen[name] = index
        return self

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("api_keys_file")
    @classmethod
    def _keys_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"api_keys_file {value} is not a file")
        return value

    def keys(self) -> list[str]:
        """Every accepted API key: `api_keys` and the lines of `api_keys_file`."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    keys.append(line.strip())
        return keys

    @property
    def served_name(self) -> str:
        """The name clients pass as `model` for the default model."""
        if self.models:
            return self.models[0].served_name
        if self.model_name:
            return self.model_name
        if self.model:  # a folder's name, or the hub id itself
            path = Path(self.model).expanduser()
            return path.name if path.is_dir() else self.model
        return self.model_dir.name

    def devices(self, cuda_count: int, cores: int, parameters: int | None = None) -> list[str]:
        """The device of each worker: explicit list, or every CUDA device, or CPU workers.

        `cpu` (or `auto` without CUDA) means `cpu_workers` replicas, or when that is 0, as many
        as suit the model (`parameters`, see `cpu_worker_count`).
        """
        if self.device == "auto":
            names = [f"cuda:{i}" for i in range(cuda_count)] or ["cpu"]
        else:
            names = [d.strip() for d in self.device.split(",") if d.strip()]
        for name in names:
            if name != "cpu" and not name.startswith("cuda"):
                raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N")
        if names == ["cpu"]:
            return ["cpu"] * self.cpu_worker_count(cores, parameters)
        return names

    def cpu_worker_count(self, cores: int, parameters: int | None = None) -> int:
        """`cpu_workers`, or by model size: a small model is dominated by the per-batch Python
        work, and two or more replicas overlap it (measured on the bundled 6 M-parameter model:
        1.4x the throughput of one two-thread worker on two cores); a large model is dominated
        by its arithmetic, where extra replicas only halve the batches (measured on a 232 M
        model: one two-thread worker gave 8.2 audio s/s, two one-thread workers 5.1)."""
        if self.cpu_workers:
            return self.cpu_workers
        if parameters is not None and parameters >= LARGE_MODEL_PARAMETERS:
            return 1
        return max(1, min(4, cores))

    def threads_per_cpu_worker(self, cores: int, workers: int) -> int:
        return self.cpu_threads or max(1, cores // max(1, workers))

    def split_for(self, cuda_count: int, cores: int) -> list[tuple["Settings", int]]:
        """Each model of `models` as the settings of a one-model server, with the CPU cores
        its workers may use. The split rule, overridable per model (`device`, `cpu_workers`,
        `cpu_threads` of its entry):

        - CUDA (`device` auto with N devices, or a list of N): models get disjoint groups of
          devices, in order, N // M each (the first N % M one more); with fewer devices than
          models, model i shares device i mod N.
        - CPU: the cores are divided evenly (the first models get the remainder, each at least
          one); a model's CPU workers and threads per worker follow from its share as for one
          model (`cpu_worker_count`, `threads_per_cpu_worker`), with `STT_CPU_WORKERS` /
          `STT_CPU_THREADS` applying to every model unless its entry says otherwise.
        """
        count = len(self.models)
        if self.device == "auto":
            pool = [f"cuda:{i}" for i in range(cuda_count)]
        elif self.device.strip() == "cpu":
            pool = []
        else:
            pool = [d.strip() for d in self.device.split(",") if d.strip() and d.strip() != "cpu"]
        groups: list[list[str]] = []
        if len(pool) >= count:
            size, extra = divmod(len(pool), count)
            start = 0
            for index in range(count):
                end = start + size + (index < extra)
                groups.append(pool[start:end])
                start = end
        else:
            groups = [[pool[index % len(pool)]] if pool else [] for index in range(count)]
        base, extra = divmod(max(cores, 1), count)
        shares = [max(1, base + (index < extra)) for index in range(count)]
        result = []
        for index, entry in enumerate(self.models):
            device = entry.device or (",".join(groups[index]) if groups[index] else "cpu")
            update: dict[str, object] = {
                "models": [],
                "model": entry.model,
                "model_name": entry.served_name,
                "model_aliases": entry.aliases + (self.model_aliases if index == 0 else []),
                "device": device,
                "cpu_workers": entry.cpu_workers or self.cpu_workers,
                "cpu_threads": entry.cpu_threads or self.cpu_threads,
            }
            if entry.language is not None:
                update["language"] = entry.language
            result.append((self.model_copy(update=update), shares[index]))
        return result
