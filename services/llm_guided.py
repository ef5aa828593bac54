"""Constrained decoding on CTranslate2: an answer that must match a JSON schema (a tool call).

CTranslate2 has no logits processors, so the grammar (xgrammar, the structured-output backend
vLLM uses) is applied around it: the model generates freely while every token it picks is one
the grammar accepts; at the first token the grammar refuses, generation stops, one step's logits
are computed (``return_logits_vocab``), the refused tokens are masked out, the best allowed one
is taken, and free generation goes on from there. A small instruct model writes valid JSON for
a schema it was shown almost always, so the masked steps are rare and cost one extra prefill
each; the result matches the schema every time, because no token the grammar refuses is ever
kept, and generation ends only where the grammar may end.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from services.errors import InvalidArgument, OutOfRange

if TYPE_CHECKING:
    from services.llm_ctranslate2 import CT2Engine

#: Compiled grammars kept per engine (schemas of the sessions' tool sets).
GRAMMAR_CACHE = 32


class GuidedDecoder:
    """Grammar-checked generation for one CTranslate2 engine (its tokenizer and end tokens)."""

    def __init__(self, tokenizer: Any, end_ids: list[int]) -> None:
        self._tokenizer = tokenizer
        self._end_ids = end_ids
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._vocab = 0
        self._grammars: OrderedDict[str, Any] = OrderedDict()
        self.masked_steps = 0  # grammar corrections made (operators, tests)

    def warm(self) -> None:
        """Build the tokenizer's grammar tables now (a fraction of a second, once)."""
        self._grammar({"type": "object"})

    def _grammar(self, schema: dict[str, Any]) -> Any:
        import xgrammar as xgr

        key = json.dumps(schema, sort_keys=True)
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, stop_token_ids=self._end_ids)
                self._vocab = info.vocab_size
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            grammar = self._grammars.get(key)
            if grammar is None:
                try:
                    # in the schema's own property order (the key is sorted): "name" before "arguments"
                    grammar = self._compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
                except Exception as exc:  # xgrammar raises RuntimeError for schemas it cannot express
                    raise InvalidArgument(f"the tool's JSON schema cannot be used for constrained decoding: {exc}") \
                        from None
                self._grammars[key] = grammar
                while len(self._grammars) > GRAMMAR_CACHE:
                    self._grammars.popitem(last=False)
            else:
                self._grammars.move_to_end(key)
            return grammar

    def run(self, engine: CT2Engine, prompt: list[str], static: list[str] | None, max_tokens: int,
            temperature: float, stop: threading.Event, schema: dict[str, Any]) -> Iterator[int]:
        """Token ids of an answer that matches ``schema`` (end token excluded)."""
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(self._grammar(schema))
        bitmask = xgr.allocate_token_bitmask(1, self._vocab)
        out: list[str] = []
        sampling = engine._sampling(temperature, static)
        while len(out) < max_tokens:
            refused = False
            steps = engine._gen.generate_tokens(prompt + out, max_length=max_tokens - len(out), **sampling)
            try:
                for step in steps:
                    if stop.is_set():
                        return
                    if not matcher.accept_token(step.token_id):
                        refused = True
                        break
                    if matcher.is_terminated():  # the grammar took an end token: the answer is whole
                        return
                    out.append(step.token)
                    yield step.token_id
            finally:
                steps.close()
            if not refused:
                break  # the token cap (or an end the grammar accepted) ended it
            token_id = self._masked_step(engine, prompt + out, static, matcher, bitmask)
            if token_id in self._end_ids:
                return
            out.append(self._tokenizer.convert_ids_to_tokens(token_id))
            yield token_id
        if not matcher.is_terminated() and not matcher.accept_token(self._end_ids[0]):
            raise OutOfRange(f"the constrained answer did not finish within {max_tokens} tokens")

    def _masked_step(self, engine: CT2Engine, prompt: list[str], static: list[str] | None, matcher: Any,
                     bitmask: Any) -> int:
        """The most likely next token the grammar allows (accepted into ``matcher``)."""
        kwargs: dict[str, Any] = {"static_prompt": static} if static is not None else {}
        result = engine._gen.generate_batch([prompt], max_length=1, include_prompt_in_result=False,
                                            return_logits_vocab=True, sampling_topk=1, **kwargs)
        logits = np.array(result[0].logits[0], dtype=np.float32).reshape(-1)
        matcher.fill_next_token_bitmask(bitmask)
        allowed = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: self._vocab].astype(bool)
        n = min(logits.size, allowed.size)
        masked = np.full(logits.size, -np.inf, dtype=np.float32)
        masked[:n] = np.where(allowed[:n], logits[:n], -np.inf)
        token_id = int(masked.argmax())
        if not np.isfinite(masked[token_id]) or not matcher.accept_token(token_id):
            raise OutOfRange("constrained decoding found no token the grammar allows")
        self.masked_steps += 1
        return token_id
