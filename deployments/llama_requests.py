"""What the Llama reads from a request: JSON for the simple route, OIP tensors, and OpenAI chats
(serve/api/openai_api.py), each checked against the deployment's limits with a message that says what
to send. A mixin of LlamaInt4Spec (deployments/llama_int4.py), which holds the limits and tokenizer."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from wire import PayloadError

from .base import decode_each

ALLOWED_KEYS = ("prompt", "max_new_tokens")


@dataclass
class Prompt:
    """One decoded request: token ids (with BOS) and how many tokens to generate at most."""

    input_ids: list[int]
    max_new_tokens: int
    truncated: bool = False
    min_new_tokens: int = 0  # > 0 only in tuning batches: forces the full length (no early end-of-text)
    text: str = field(default="", repr=False)


class LlamaRequests:
    """decode, decode_tensors and the chat template; needs max_prompt_tokens, max_new_tokens,
    default_new_tokens, truncate_prompt, max_request_bytes and get_tokenizer() from the spec."""

    def decode(self, payload: bytes, content_type: str | None = None) -> Prompt:
        try:
            return self._decode(payload)
        except PayloadError:
            raise
        except Exception as exc:  # noqa: BLE001 - nothing a payload holds may escape as anything else
            raise PayloadError(f"request could not be read ({type(exc).__name__}); send JSON "
                               f'{{"prompt": "...", "max_new_tokens": 1..{self.max_new_tokens}}}', 400) from None

    def _utf8_within_limit(self, raw: bytes, sized: str, named: str, send: str) -> str:
        """`raw` as text: 413 over max_request_bytes (`sized` names it), 400 if not UTF-8 (`named`)."""
        if len(raw) > self.max_request_bytes:
            raise PayloadError(f"{sized} is {len(raw)} bytes, over the limit of {self.max_request_bytes} bytes; "
                               f"send a shorter prompt (at most {self.max_prompt_tokens} tokens)", 413)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(f"{named} is not UTF-8 ({exc.reason} at byte {exc.start}); send {send}", 400) from None

    def _decode(self, payload) -> Prompt:
        shape = f'{{"prompt": "<text>", "max_new_tokens": <1..{self.max_new_tokens}, optional, default {self.default_new_tokens}>}}'
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise PayloadError(f"request body must be bytes of JSON, got {type(payload).__name__}; send {shape}", 400)
        payload = bytes(payload)
        if not payload.strip():
            raise PayloadError(f"empty request body; send JSON {shape}", 400)
        text = self._utf8_within_limit(payload, "request", "request body", f"UTF-8 JSON {shape}")
        try:
            body = json.loads(text)
        except (ValueError, RecursionError) as exc:
            detail = f"{exc.msg} at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else type(exc).__name__
            raise PayloadError(f"request body is not valid JSON ({detail}); send {shape}", 400) from None
        if not isinstance(body, dict):
            raise PayloadError(f"request JSON must be an object, got {type(body).__name__}; send {shape}", 400)
        unknown = sorted(str(k) for k in body if k not in ALLOWED_KEYS)
        if unknown:
            raise PayloadError(f"unknown field(s) {', '.join(repr(k[:40]) for k in unknown[:5])}; this deployment does "
                               f"greedy generation; send only {shape}", 422)
        if "prompt" not in body:
            raise PayloadError(f'missing "prompt"; send {shape}', 422)
        if not isinstance(body["prompt"], str):
            raise PayloadError(f'"prompt" must be a string, got {type(body["prompt"]).__name__}; send {shape}', 422)
        return self._prompt(body["prompt"], body.get("max_new_tokens", self.default_new_tokens), shape)

    def _prompt(self, prompt: str, new_tokens, send: str, names: tuple[str, str] = ("prompt", "max_new_tokens")) -> Prompt:
        """A prompt and its token count checked and tokenized; `names` are the client's names for them."""
        if not prompt:
            raise PayloadError(f'"{names[0]}" is empty; send some text to continue, as {send}', 422)
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int):
            raise PayloadError(f'"{names[1]}" must be a whole number, got {type(new_tokens).__name__}; '
                               f"send 1..{self.max_new_tokens} or leave it out", 422)
        if not 1 <= new_tokens <= self.max_new_tokens:
            raise PayloadError(f'"{names[1]}" is {new_tokens}, out of range; send 1..{self.max_new_tokens} '
                               f"or leave it out (default {self.default_new_tokens})", 422)
        tokenizer = self.get_tokenizer()
        # Control tokens typed into a prompt stay text: a client cannot inject <|end_of_text|> etc.
        ids = list(tokenizer(prompt, split_special_tokens=True)["input_ids"])
        truncated = False
        if len(ids) > self.max_prompt_tokens:
            if not self.truncate_prompt:
                raise PayloadError(f"prompt is {len(ids)} tokens, over the limit of {self.max_prompt_tokens}; "
                                   f"shorten it", 413)
            keep = self.max_prompt_tokens
            head = [ids[0]] if ids and ids[0] == tokenizer.bos_token_id else []
            ids = head + ids[len(ids) - (keep - len(head)):]  # keep BOS and the end of the prompt
            truncated = True
        return Prompt(ids, int(new_tokens), truncated=truncated, text=prompt)

    def decode_tensors(self, inputs: dict, parameters: dict) -> list:
        """text_input per sample; max_tokens from the input, else the request's parameter, else the default."""
        texts, tokens = inputs["text_input"], parameters.get("max_tokens", self.default_new_tokens)
        tokens = [int(t) for t in inputs["max_tokens"]] if "max_tokens" in inputs else [tokens] * len(texts)
        send = f"text_input (BYTES, one UTF-8 prompt per sample) and max_tokens (1..{self.max_new_tokens})"

        def one(pair) -> Prompt:
            prompt = self._utf8_within_limit(bytes(pair[0]), "prompt", "text_input", send)
            return self._prompt(prompt, pair[1], send, ("text_input", "max_tokens"))

        return decode_each(one, zip(texts, tokens))

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """A chat as prompt tokens: the checkpoint's own chat template when it has one, else the synthetic
        tokenizer's (`<|role|>` lines, the assistant's turn open); message text never becomes control tokens."""
        tokenizer = self.get_tokenizer()
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        ids = [tokenizer.bos_token_id]
        for message in messages:
            text = f"<|{message['role']}|>\n{message['content']}\n"
            ids += tokenizer(text, split_special_tokens=True, add_special_tokens=False)["input_ids"]
        return ids + tokenizer("<|assistant|>\n", add_special_tokens=False)["input_ids"]

    def checked_ids(self, ids: list[int], new_tokens: int, names: tuple[str, str] = ("messages", "max_tokens")) -> Prompt:
        """Token ids (a chat) held to the same limits as a prompt."""
        if len(ids) > self.max_prompt_tokens:
            raise PayloadError(f"{names[0]} is {len(ids)} tokens with the chat template, over the limit of "
                               f"{self.max_prompt_tokens}; shorten it", 413)
        if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or not 1 <= new_tokens <= self.max_new_tokens:
            raise PayloadError(f'"{names[1]}" must be a whole number 1..{self.max_new_tokens}, got {new_tokens!r}', 422)
        return Prompt(list(ids), new_tokens)

