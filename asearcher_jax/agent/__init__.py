"""The ASearcher agent: prompts, parsing, the episode loop (base and reasoning variants), the
policies it talks to, and the trajectory record it produces."""

from asearcher_jax.agent.config import AgentSection
from asearcher_jax.agent.episode import Agent, score
from asearcher_jax.agent.parse import Action, parse_action
from asearcher_jax.agent.policy import (
                                        Completion,
                                        ContextTooLong,
                                        DecodePolicy,
                                        OpenAIPolicy,
                                        Policy,
                                        PolicyUnavailable,
                                        Prompt,
)
from asearcher_jax.agent.trajectory import STATUSES, Trajectory, Turn, read_jsonl, write_jsonl

__all__ = ["Action", "Agent", "AgentSection", "Completion", "ContextTooLong", "DecodePolicy",
           "OpenAIPolicy", "Policy", "PolicyUnavailable", "Prompt", "STATUSES", "Trajectory",
           "Turn", "parse_action", "read_jsonl", "score", "write_jsonl"]
