"""Local fake platforms for tests and for trying the bot offline (issue 5).

* :mod:`bot.fakes.x_server`: ``FakeX``, an X API v2 server (Starlette/uvicorn in
  a background thread); :mod:`bot.fakes.x_transport` mounts it on a tweepy
  client's ``requests`` session.
* :mod:`bot.fakes.discord_server`: ``FakeDiscord``, Discord REST v10 plus the
  gateway websocket (aiohttp), reached through discord.py's ``Route.BASE`` and
  ``DiscordWebSocket.DEFAULT_GATEWAY``; its records (what the bot sent, the
  guilds and users) are in :mod:`bot.fakes.discord_records`.

Both bind 127.0.0.1 on an ephemeral port by default, keep all state in memory,
record what the bot sent, and can inject 429s, 5xx, duplicates and expiry.
Nothing is imported here, so importing one fake does not pull in the other's
web stack.
"""
