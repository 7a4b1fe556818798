"""The moderator dashboard served by `dallebot serve` (see :mod:`bot.dashboard.app`)."""
