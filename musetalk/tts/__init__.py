"""Text-to-speech plugins (VoiceEngine): chosen by name in config, imported lazily."""
