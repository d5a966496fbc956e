"""Sans-I/O protocols of the relay: ElevenLabs ConvAI upstream, the browser client contract, and
how a call's end is named. No sockets and no asyncio here."""
