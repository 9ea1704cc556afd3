"""A prompt encoder that lives on another machine: the client of `featherflux encode-server`.

`RemotePromptEncoder` has the `PromptEncoder` interface (`model_id`, `family`, `encode`), so a pipeline uses it
exactly like a local encoder and never loads text-encoder weights.

Design choices:
- Construction asks the server who it is (`GET /v1/models`), so a wrong URL, a refused token or a server that
  encodes for another family fails at `load_pipeline`, not halfway through a batch of images.
- Encoding is idempotent, so connection errors, time-outs and 5xx answers are retried with exponential backoff;
  4xx answers are not (the request itself is wrong). 401/403 become a `UserError` that says which token to fix.
- The body is safetensors and is checked field by field (`wire.decode_embeddings`); nothing is unpickled.
- Prompt lists longer than the server's per-request limit are sent in chunks.
"""

from __future__ import annotations

import base64
import io
import os
import time
from typing import TYPE_CHECKING

import torch

from featherflux.errors import MissingExtraError, UserError
from featherflux.text_encoder.wire import decode_embeddings

if TYPE_CHECKING:
    import httpx

TOKEN_ENV = "FEATHERFLUX_TEXT_ENCODER_TOKEN"  # read when no token is passed, so tokens stay off command lines


def _httpx():
    """The HTTP client package, which only a remote encoder needs: part of the serve extra."""
    try:
        import httpx  # optional: imported when a remote encoder is connected
    except ImportError:
        raise MissingExtraError("a remote text encoder", "serve") from None
    return httpx


class RemoteEncoderError(UserError):
    """The encode server could not be reached, refused us, or answered something we cannot use."""


class RemotePromptEncoder:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        family: str | None = None,
        context_dim: int | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff_s: float = 0.5,
    ):
        """Connect to the encode server at `url`.

        `token` defaults to $FEATHERFLUX_TEXT_ENCODER_TOKEN. `family` (the pipeline's family name) must share its
        text encoder with the server's family, and `context_dim` (the DiT's context width) must be the width of the
        embeddings the server sends; each check is skipped when None.
        """
        if not url.startswith(("http://", "https://")):
            raise UserError(f"text encoder URL {url!r} must start with http:// or https://")
        self.url = url.rstrip("/")
        self.retries, self.backoff_s = retries, backoff_s
        self.context_dim = context_dim
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # Connecting should be quick; reading may wait for a big encoder behind a queue.
        self._httpx = _httpx()
        timeouts = self._httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._http = self._httpx.Client(headers=headers, timeout=timeouts)
        try:
            info = self._server_info()
        except BaseException:
            self.close()
            raise
        self.model_id: str = info["id"]
        self.family: str = info["family"]
        self.max_prompts: int = info["max_prompts"]
        self.max_sequence_length: int = info["max_sequence_length"]
        if family is not None and text_encoder_family(family) != text_encoder_family(self.family):
            self.close()
            raise RemoteEncoderError(
                f"the encode server at {self.url} encodes for family {self.family!r} (model {self.model_id!r}), "
                f"but the pipeline is {family!r}; point --text-encoder at a server running a {family} encoder"
            )

    def _server_info(self) -> dict:
        response = self._request("GET", "/v1/models")  # its own errors (refused, unreachable) pass through
        try:
            info = response.json()["data"][0]
            return {key: info[key] for key in ("id", "family", "max_prompts", "max_sequence_length")}
        except (ValueError, KeyError, IndexError, TypeError):
            raise RemoteEncoderError(f"{self.url} does not answer like a featherflux encode-server") from None

    def encode(
        self, prompts: list[str], max_sequence_length: int = 512, out_layers: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Embeddings (B, L, D) for `prompts`, bit for bit what the server's local encoder gives."""
        if out_layers is not None:
            raise UserError(
                "text_encoder_out_layers cannot be chosen per call with a remote text encoder; the encode server "
                "stacks the layers it was started with"
            )
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise UserError("no prompts to encode")
        if max_sequence_length > self.max_sequence_length:
            raise UserError(
                f"max_sequence_length={max_sequence_length} is above the encode server's limit "
                f"{self.max_sequence_length}"
            )
        parts = []
        for start in range(0, len(prompts), self.max_prompts):
            chunk = prompts[start : start + self.max_prompts]
            response = self._request(
                "POST", "/v1/encode", json={"prompts": chunk, "max_sequence_length": max_sequence_length}
            )
            embeds, header = decode_embeddings(
                response.content, prompt_count=len(chunk), max_sequence_length=max_sequence_length
            )
            if header.family != self.family or header.model_id != self.model_id:
                raise RemoteEncoderError(
                    f"the encode server at {self.url} switched model mid-session: it now serves "
                    f"{header.model_id!r} ({header.family}), we connected to {self.model_id!r} ({self.family})"
                )
            if self.context_dim is not None and embeds.shape[-1] != self.context_dim:
                raise RemoteEncoderError(
                    f"the encode server at {self.url} sends {embeds.shape[-1]}-wide embeddings ({self.model_id}), "
                    f"but the pipeline's transformer takes {self.context_dim}; it serves another model"
                )
            parts.append(embeds)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def upsample(
        self, prompts: list[str], images=None, temperature: float = 0.15, seed: int | None = None
    ) -> list[str]:
        """Caption upsampling on the server's whole text encoder (`POST /v1/upsample`), so a worker without the text
        encoder can still upsample. `seed` (drawn from the global torch RNG when None, so a seeded caller gets the same
        text each time) seeds the server's sampling; `images`: None or one list of pictures per prompt."""
        if seed is None:
            seed = int(torch.randint(0, 2**31, (1,)))
        body = {"prompts": list(prompts), "temperature": temperature, "seed": seed}
        if images is not None:
            body["images"] = [[_png_base64(picture) for picture in group] for group in images]
        response = self._request("POST", "/v1/upsample", json=body)
        try:
            written = response.json()["prompts"]
        except (ValueError, KeyError, TypeError):
            raise RemoteEncoderError(f"{self.url} answered /v1/upsample with something else than prompts") from None
        if not isinstance(written, list) or len(written) != len(prompts) or not all(isinstance(t, str) for t in written):
            raise RemoteEncoderError(f"{self.url} answered /v1/upsample with a wrong list for {len(prompts)} prompts")
        return written

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                response = self._http.request(method, self.url + path, **kwargs)
            except self._httpx.TransportError as e:  # refused, reset, timed out: the server may be restarting
                if last:
                    raise RemoteEncoderError(
                        f"cannot reach the encode server at {self.url} after {self.retries + 1} attempts "
                        f"({type(e).__name__}: {e}); is `featherflux encode-server` running there?"
                    ) from None
            else:
                if response.status_code < 500:
                    break
                if last:
                    raise RemoteEncoderError(
                        f"the encode server at {self.url} failed {self.retries + 1} times: "
                        f"{response.status_code} {_message(response)}"
                    )
            time.sleep(self.backoff_s * 2**attempt)
        if response.status_code in (401, 403):
            raise RemoteEncoderError(
                f"the encode server at {self.url} refused the token ({response.status_code}: {_message(response)}); "
                f"pass the server's token as text_encoder_token= or in ${TOKEN_ENV}"
            )
        if response.status_code != 200:
            raise RemoteEncoderError(
                f"the encode server at {self.url} rejected the request: {response.status_code} {_message(response)}"
            )
        return response

    def close(self):
        self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"RemotePromptEncoder({self.url!r}, model_id={self.model_id!r}, family={self.family!r})"


def text_encoder_family(family: str) -> str:
    """One name for the families that share a text encoder: klein, klein-base and klein-kv of one size."""
    return family.replace("klein-base", "klein").removesuffix("-kv")


def _message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


def connect_text_encoder(url: str, token: str | None, family, prompt_encoder=None) -> RemotePromptEncoder:
    """The remote prompt encoder for `load_pipeline(text_encoder=url)`, checked against the pipeline's `family`."""
    if prompt_encoder is not None:
        raise UserError("pass either prompt_encoder= or text_encoder=URL to load_pipeline, not both")
    return RemotePromptEncoder(url, token, family=family.name, context_dim=family.dit.context_in_dim)


def _png_base64(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
