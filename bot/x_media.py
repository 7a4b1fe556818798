"""One-shot image upload to X API v2 (``POST /2/media/upload``), OAuth 1.0a signed.

tweepy 4.17 only wraps the deprecated v1.1 ``upload.twitter.com`` endpoints
(tweepy#2217), so this module makes the v2 call itself with the pieces tweepy
already depends on: the tweepy client's ``requests.Session`` (so an adapter
mounted on it, such as the test fake's, applies here too) and
``requests_oauthlib.OAuth1``.  The body is multipart (raw bytes in ``media``);
OAuth 1.0a does not sign multipart bodies, only the URL and OAuth parameters.

Errors surface as the same ``tweepy`` exceptions ``tweepy.Client`` raises
(``TooManyRequests`` with ``reset_time``, ``Forbidden``, ``TwitterServerError``
...), so callers handle uploads and tweets in one place.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import requests
import tweepy
from requests_oauthlib import OAuth1

__all__ = ["UploadedMedia", "upload_image", "upload_image_for_client", "MEDIA_UPLOAD_URL"]

MEDIA_UPLOAD_URL = "https://api.x.com/2/media/upload"


@dataclasses.dataclass(frozen=True, slots=True)
class UploadedMedia:
    """What X returned: put ``id`` into ``create_tweet(media_ids=[...])``."""

    id: str
    media_key: str | None
    size: int | None
    expires_after_secs: int | None

    @classmethod
    def from_response(cls, payload: dict[str, Any]) -> UploadedMedia:
        data = payload["data"]
        return cls(id=str(data["id"]), media_key=data.get("media_key"), size=data.get("size"),
                   expires_after_secs=data.get("expires_after_secs"))


def _raise_for_status(response: requests.Response) -> None:
    """Mirror ``tweepy.client.BaseClient.request``'s status-to-exception mapping."""
    status = response.status_code
    if 200 <= status < 300:
        return
    if status == 400:
        raise tweepy.BadRequest(response)
    if status == 401:
        raise tweepy.Unauthorized(response)
    if status == 403:
        raise tweepy.Forbidden(response)
    if status == 404:
        raise tweepy.NotFound(response)
    if status == 429:
        reset = response.headers.get("x-rate-limit-reset")
        raise tweepy.TooManyRequests(response, reset_time=int(reset) if reset is not None else None)
    if status >= 500:
        raise tweepy.TwitterServerError(response)
    raise tweepy.HTTPException(response)


def upload_image(
    session: requests.Session,
    auth: OAuth1,
    data: bytes,
    *,
    media_type: str = "image/png",
    media_category: str = "tweet_image",
    filename: str = "image.png",
    url: str = MEDIA_UPLOAD_URL,
    timeout: float = 30.0,
) -> UploadedMedia:
    """Upload one image (≤ 5 MB) and return its media id.  Blocking: call it
    from a worker thread (``asyncio.to_thread``), like tweepy itself."""
    response = session.post(
        url,
        files={"media": (filename, data, media_type)},
        data={"media_category": media_category, "media_type": media_type},
        auth=auth,
        timeout=timeout,
    )
    with response:
        _raise_for_status(response)
        return UploadedMedia.from_response(response.json())


def upload_image_for_client(client: tweepy.Client, data: bytes, **kwargs: Any) -> UploadedMedia:
    """:func:`upload_image` with the session and OAuth 1.0a user credentials of
    a ``tweepy.Client`` (the bot account's consumer key/secret and access token/secret)."""
    auth = OAuth1(
        client.consumer_key,
        client_secret=client.consumer_secret,
        resource_owner_key=client.access_token,
        resource_owner_secret=client.access_token_secret,
        decoding=None,
    )
    return upload_image(client.session, auth, data, **kwargs)
