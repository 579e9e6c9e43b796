"""Backend of the chat page: job store, LLM plugins, sentence splitting, the job runner and its routes."""

from webapp.backend.jobs import Job, JobNotFound, JobState, JobStore, SentenceResult
from webapp.backend.llm import LLM, BuiltinResponder, ChatMessage, LLMError, OpenAIChatClient, build_llm
from webapp.backend.routes import chat_router_from_config, create_chat_router
from webapp.backend.sentences import SentenceSplitter, split_sentences
from webapp.backend.service import ChatService, SpeakFn, SpeakOutcome

__all__ = [
    "LLM",
    "BuiltinResponder",
    "ChatMessage",
    "ChatService",
    "Job",
    "JobNotFound",
    "JobState",
    "JobStore",
    "LLMError",
    "OpenAIChatClient",
    "SentenceResult",
    "SentenceSplitter",
    "SpeakFn",
    "SpeakOutcome",
    "build_llm",
    "chat_router_from_config",
    "create_chat_router",
    "split_sentences",
]
