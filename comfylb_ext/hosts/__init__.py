"""Hosts wire the core into a server: `standalone` (own aiohttp app) or `comfyui`."""
