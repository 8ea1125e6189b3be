"""The base agent's growing context: pieces of prompt, model output and tool observations,
rendered as plain text (base models) or through the chat template (chat models), with exact
token ids for token backends and messages for chat endpoints."""

from __future__ import annotations

import dataclasses
from typing import Literal

from asearcher_jax.agent.policy import Completion, Prompt
from asearcher_jax.models.tokenizer import Tokenizer

_SENTINEL = "\u27e6asearcher-sentinel\u27e7"


@dataclasses.dataclass
class Piece:
  role: Literal["prompt", "policy", "tool", "template"]
  content: str  # what a chat endpoint sees as the message content
  text: str  # as rendered into the context
  ids: list[int] | None
  lead: str = ""  # chat: the text that closed the model's message before this observation


def observation(content: str) -> str:
  return f"<information>\n{content}\n</information>"


class Context:
  def __init__(self, prompt: str, *, template: Literal["plain", "chat"],
               tokenizer: Tokenizer | None, eos_text: str | None = None):
    self.template, self.tokenizer = template, tokenizer
    self.pieces: list[Piece] = []
    if template == "chat":
      if tokenizer is None:  # a chat endpoint renders its own template: messages only
        text = prompt
      else:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True)
        self._close, self._delta, self._header = self._chat_pieces()
    else:
      text = prompt
    self.eos_text = eos_text
    self.pieces.append(Piece("prompt", prompt, text, self._encode(text)))

  def _encode(self, text: str) -> list[int] | None:
    return None if self.tokenizer is None else self.tokenizer.encode(text)

  def _chat_pieces(self) -> tuple[str, str, str]:
    """(text that closes an assistant message, text from there to the next generation prompt
    with the user message's content as `_SENTINEL`, the generation prompt that opens an
    assistant message), read off the chat template itself."""
    base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}]
    render = self.tokenizer.apply_chat_template
    a = render(base, add_generation_prompt=False)
    b = render(base + [{"role": "user", "content": _SENTINEL}], add_generation_prompt=True)
    if not b.startswith(a) or _SENTINEL not in a:
      raise ValueError("the chat template re-renders earlier messages; the agent needs a "
                       "template whose history is a prefix of its continuation")
    header = render(base, add_generation_prompt=True)[len(a):]
    return a[a.rindex(_SENTINEL) + len(_SENTINEL):], b[len(a):], header

  # -- views -----------------------------------------------------------------------------------
  @property
  def num_tokens(self) -> int:
    if self.tokenizer is None:  # text endpoints without a tokenizer: ~4 characters a token
      return sum(len(p.text) for p in self.pieces) // 4
    return sum(len(p.ids) for p in self.pieces)

  def prompt(self) -> Prompt:
    ids = None if self.tokenizer is None else [i for p in self.pieces for i in p.ids]
    return Prompt(ids, "".join(p.text for p in self.pieces), self.messages())

  def messages(self) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    split = False
    for p in self.pieces:
      if p.role == "template":  # a new assistant message follows
        split = True
        continue
      role = "assistant" if p.role == "policy" else "user"
      if out and out[-1]["role"] == role and not split:
        out[-1]["content"] += ("" if role == "assistant" else "\n\n") + p.content
      else:
        out.append({"role": role, "content": p.content})
      split = False
    return out

  # -- growth ----------------------------------------------------------------------------------
  def add_policy(self, c: Completion) -> None:
    ids = c.ids if c.ids is not None else self._encode(c.text)
    content = c.text  # a chat message's content does not hold the token that ends it
    if self.template == "chat" and self.eos_text and content.endswith(self.eos_text):
      content = content[:-len(self.eos_text)]
    self.pieces.append(Piece("policy", content, c.text, ids))

  def reopen(self) -> None:
    """After the model ended its message with no observation to follow (a chat model's
    reading note), opens the next assistant message."""
    prev = self.pieces[-1]
    if (self.template != "chat" or self.tokenizer is None or prev.role != "policy"
        or not self.eos_text or not prev.text.endswith(self.eos_text)):
      return
    close = self._close[len(self.eos_text):] if self._close.startswith(self.eos_text) else ""
    text = close + self._header
    self.pieces.append(Piece("template", "", text, self._encode(text)))

  def add_observation(self, content: str) -> int:
    """Appends a tool observation; returns its index (for `replace`)."""
    self.pieces.append(self._observation_piece(content))
    return len(self.pieces) - 1

  def replace(self, index: int, content: str) -> None:
    """Rewrites an observation (a read page chunk becomes its stub)."""
    self.pieces[index] = self._observation_piece(content, lead=self.pieces[index].lead)

  def _observation_piece(self, content: str, lead: str | None = None) -> Piece:
    body = observation(content)
    if self.template == "plain":
      return Piece("tool", body, f"\n\n{body}\n<think>\n", self._encode(f"\n\n{body}\n<think>\n"))
    if self.tokenizer is None:
      return Piece("tool", body, body, None)
    if lead is None:
      lead, prev = self._close, self.pieces[-1]
      if (prev.role == "policy" and self.eos_text and prev.text.endswith(self.eos_text)
          and lead.startswith(self.eos_text)):
        lead = lead[len(self.eos_text):]  # the model already ended its message
    text = lead + self._delta.replace(_SENTINEL, body)
    return Piece("tool", body, text, self._encode(text), lead)
