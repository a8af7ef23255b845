"""The codec interface, the registry of codecs by name, and the KV layout codecs assume.

- `Codec`: `encode(tensor) -> bytes` (a whole container: header, parameters, payload) and
  `decode(data, out=None) -> tensor`. A subclass implements `encode_payload` and
  `decode_payload` and declares `name`, `codec_id` (a stable byte in containers; never
  reused), `lossless` and `PARAMS` (its parameters with defaults).
- `register`, `codec_from_spec("cachegen:level=1")`, `codec_by_id(id, params)`.
- `kv_view(tensor)`: the `[layers, 2, tokens, heads, head_dim]` KV layout lossy codecs
  need, as K and V views, or a clear error.

Parameters are integers, floats or short names, written into the container as text
(`group=32;level=1`), so a container says everything needed to decode it. No pickle.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar

import torch

from kvstore.codecs.container import ContainerError, MissingContext
from kvstore.errors import InvalidArgument
from kvstore.kernels.floatbits import WORD_KINDS

# The dtypes whose 16-bit words the codecs' kernels read and write, with their kind code.
DTYPE_WORDS: Mapping[torch.dtype, int] = {getattr(torch, n): k for n, k in WORD_KINDS.items()}

ParamValue = int | float | str


class Codec(ABC):
    """One way to turn a tensor into bytes and back; instances carry their parameters."""

    name: ClassVar[str]
    codec_id: ClassVar[int]
    lossless: ClassVar[bool]
    # Parameter name -> default; the type of the default is the parameter's type.
    PARAMS: ClassVar[Mapping[str, ParamValue]] = {}
    # Parameters that only steer the encoder (a file it reads): not written into containers,
    # which decode the same without them, also by builds that do not know them.
    ENCODER_ONLY: ClassVar[frozenset[str]] = frozenset()
    # The value a parameter has in containers that do not record it, written by builds from
    # before it existed (a payload format's version: 1), where it differs from the default
    # a new encoder takes.
    LEGACY_PARAMS: ClassVar[Mapping[str, ParamValue]] = {}
    # The bytes of values a GPU encoder's batch of this codec holds at most (the ssd
    # writer's batches); None: the store's default (WRITE_AHEAD_GPU_BYTES).
    GPU_BATCH_BYTES: ClassVar[int | None] = None
    # Its kernels run numba parallel regions (a team of threads each call). Where several
    # threads code at once (a server's host pool), numba then needs a thread-safe threading
    # layer (`kvstore.threads.threadsafe_layer`): its fallback aborts the process.
    thread_teams: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.PARAMS))
        if unknown:
            known = ", ".join(sorted(self.PARAMS)) or "none"
            raise InvalidArgument(
                f"codec {self.name!r} has no parameter {unknown[0]!r} (parameters: {known})"
            )
        self.params: dict[str, ParamValue] = {}
        for key, default in self.PARAMS.items():
            raw = params.get(key, default)
            try:
                value: ParamValue = type(default)(raw)
            except (TypeError, ValueError):
                raise InvalidArgument(
                    f"codec {self.name!r}: {key}={raw!r} is not a {type(default).__name__}"
                ) from None
            self.params[key] = value
        self.check_params()

    def check_params(self) -> None:  # noqa: B027  (optional hook, not abstract)
        """Raise InvalidArgument for parameter values out of range (by default, none are)."""

    def for_newest(self) -> Codec:
        """The codec for the newest chunk of a sequence (a put's `newest` value: the one the
        next request's tokens follow, which they attend to most): by default this one; a
        codec with a finer setting for it (`cachegen:newest=0`) returns that."""
        return self

    def for_position(self, position: int, shape: Sequence[int] | None = None) -> Codec:
        """The codec for a value (of `shape`, when known) whose first token is at absolute
        position `position` of its sequence (a chunk of a prefix: its index times the chunk
        size): by default this one; a codec that codes K with RoPE taken out (`cachegen`
        with a cross-layer profile, for values of the shape its maps are for) returns one
        that records the position."""
        return self

    def spec(self) -> str:
        """The spec that selects this codec with these parameters: 'kivi:bits=2,group=32'
        (an encoder-only parameter left at its default is left out)."""
        items = [
            f"{k}={v}"
            for k, v in sorted(self.params.items())
            if not (k in self.ENCODER_ONLY and v == self.PARAMS[k])
        ]
        return self.name + (":" + ",".join(items) if items else "")

    def container_params(self) -> str:
        """The parameters a container records ('group=32;level=1'): all but the
        encoder-only ones and those at their `LEGACY_PARAMS` value, which a container then
        reads the same without (so builds that predate the parameter read it too)."""
        return ";".join(
            f"{k}={v}"
            for k, v in sorted(self.params.items())
            if k not in self.ENCODER_ONLY
            and (k not in self.LEGACY_PARAMS or self.LEGACY_PARAMS[k] != v)
        )

    def __repr__(self) -> str:
        return f"<codec {self.spec()}>"

    def encode(self, tensor: torch.Tensor) -> bytes:
        """The whole container for `tensor` (on any device; encoded on the CPU here)."""
        from kvstore.codecs.values import encode_value

        return encode_value(self, tensor)

    def decode(
        self, data: bytes | bytearray | memoryview, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode a container made by this codec (`kvstore.codecs.decode` takes any)."""
        from kvstore.codecs.values import decode_value

        return decode_value(data, out, expect=self)

    @abstractmethod
    def encode_payload(self, tensor: torch.Tensor) -> bytes:
        """The payload for a contiguous CPU `tensor`; raise InvalidArgument when this codec
        cannot take it (a shape or dtype it does not handle)."""

    @abstractmethod
    def decode_payload(self, payload: memoryview, out: torch.Tensor) -> None:
        """Fill the contiguous CPU tensor `out` (the dtype and shape the container names)
        from `payload`; raise ContainerError when the payload does not fit them."""

    def encode_with_value(
        self, tensor: torch.Tensor, out: torch.Tensor | None = None
    ) -> tuple[bytes | memoryview, torch.Tensor]:
        """The payload for `tensor` and the tensor it decodes to, whose checksum a lossy
        codec's container carries: `out` (contiguous, on the host, `tensor`'s shape and
        dtype) if given, else a new tensor. By default by decoding the payload; a codec
        that reconstructs the values while encoding writes them instead."""
        payload = self.encode_payload(tensor)
        back = torch.empty_like(tensor) if out is None else out
        self.decode_payload(memoryview(payload), back)
        return payload, back

    @classmethod
    def gpu_decoder(cls) -> Callable[[Sequence[Any], Any], Any] | None:
        """The function that decodes a batch of this codec's payloads into CUDA tensors
        on the GPU (`kvstore.kernels.cachegen.decode_on_gpu` is the model: jobs of (codec,
        payload, out, value checksum) and a stream in, a handle with `wait()` out), or None
        when the codec decodes on the CPU only."""
        return None

    @classmethod
    def gpu_encoder(cls) -> Callable[..., list[tuple[memoryview, int]]] | None:
        """The function that encodes a batch of values on a GPU (`kvstore.kernels.
        cachegen_encode.encode_many_on_gpu` is the model: the codec, CUDA tensors or host
        tensors with the GPU to copy them to, in; per value the payload `encode_payload`
        makes and the checksum of the value it decodes to, out), or None when the codec
        encodes on the CPU only."""
        return None

    def gpu_batch(self) -> Hashable:
        """Values whose codecs give equal keys are encoded in one batch on a GPU, the
        encoder given a codec per value where they are not all this one (cachegen-x: one
        profile's maps, at each value's position and level); by default, this codec's own
        values only."""
        return id(self)


_REGISTRY: dict[str, type[Codec]] = {}
_BY_ID: dict[int, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator adding a codec to the registry."""
    if cls.name in _REGISTRY or cls.codec_id in _BY_ID:
        raise RuntimeError(f"codec {cls.name} (id {cls.codec_id}) registered twice")
    if not 0 <= cls.codec_id < 256:
        raise RuntimeError(f"codec id {cls.codec_id} does not fit a byte")
    _REGISTRY[cls.name] = cls
    _BY_ID[cls.codec_id] = cls
    return cls


# Every codec module, imported (and so registered) the first time the registry is asked.
CODEC_MODULES = ("raw", "zstd", "quant", "kivi", "cachegen", "cachegen_cross")


def _load_codecs() -> None:
    if len(_REGISTRY) < len(CODEC_MODULES):
        for name in CODEC_MODULES:
            importlib.import_module(f"kvstore.codecs.{name}")


def codec_names() -> list[str]:
    _load_codecs()
    return sorted(_REGISTRY)


def codec_ids(names: Sequence[str]) -> frozenset[int]:
    """The ids of the codecs named (InvalidArgument for an unknown name)."""
    _load_codecs()
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise InvalidArgument(f"unknown codec {unknown[0]!r}; known: {', '.join(codec_names())}")
    return frozenset(_REGISTRY[n].codec_id for n in names)


def gpu_decodable_codecs() -> frozenset[int]:
    """The ids of the codecs that decode on the GPU (`Codec.gpu_decoder`): those a client
    asks to receive encoded (it fetches the maps a cachegen-x container names from its
    server when it has not loaded them: `MissingContext`)."""
    _load_codecs()
    return frozenset(c.codec_id for c in _REGISTRY.values() if c.gpu_decoder() is not None)


def codec_class(name: str) -> type[Codec]:
    """The codec registered as `name` (InvalidArgument if none is)."""
    _load_codecs()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise InvalidArgument(f"unknown codec {name!r}; known: {', '.join(codec_names())}")
    return cls


def codec_from_spec(spec: str) -> Codec:
    """A codec from 'name' or 'name:key=value,key=value' (as on the command line)."""
    name, _, rest = spec.strip().partition(":")
    cls = codec_class(name.strip())
    params: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise InvalidArgument(f"codec spec {spec!r}: expected key=value, got {item!r}")
        params[key.strip()] = value.strip()
    return cls(**params)


def codec_by_id(codec_id: int, params: Mapping[str, str]) -> Codec:
    """The codec a container names, with its recorded parameters."""
    _load_codecs()
    cls = _BY_ID.get(codec_id)
    if cls is None:
        raise ContainerError(f"container uses unknown codec id {codec_id}")
    try:
        return cls(**{**cls.LEGACY_PARAMS, **params})
    except MissingContext:
        raise
    except InvalidArgument as exc:
        raise ContainerError(f"container has bad parameters for codec {cls.name}: {exc}") from None


class ValuesRefused(InvalidArgument):
    """Values of a batch that the codec cannot take (a GPU encoder's batch): `indexes`,
    their places in the batch, ascending. The others can be encoded without them."""

    def __init__(self, message: str, indexes: Sequence[int]) -> None:
        super().__init__(message)
        self.indexes = sorted(indexes)


def kv_view(tensor: torch.Tensor, codec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of a `[layers, 2, tokens, heads, head_dim]` tensor, each
    `[layers, tokens, heads, head_dim]`; InvalidArgument for any other layout."""
    if tensor.dim() != 5 or tensor.shape[1] != 2:
        raise InvalidArgument(
            f"codec {codec!r} needs KV laid out [layers, 2, tokens, heads, head_dim]; "
            f"got shape {tuple(tensor.shape)}"
        )
    if not tensor.is_floating_point():
        raise InvalidArgument(f"codec {codec!r} needs a floating-point tensor, got {tensor.dtype}")
    return tensor[:, 0], tensor[:, 1]
