"""The HTTP server: LoRAX, TGI and OpenAI dialects over one AsyncEngine."""
