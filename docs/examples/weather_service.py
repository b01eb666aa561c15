"""A stand-in weather API for the tool bot: a small local HTTP service that wants an API key.

    WEATHER_API_KEY=dev-weather-key python docs/examples/weather_service.py [--port 8088]

GET /forecast?city=Paris&days=3 with `Authorization: Bearer KEY` answers a made-up (but
stable) forecast as plain text; a missing or wrong key gets 401. The relay's broker is what
calls it (docs/examples/tools.toml), with the key it reads from OpenBao: the bot never has it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.server
import os
import sys
import urllib.parse

SKIES = ("sunny", "cloudy", "rain", "windy", "snow", "fog")


def forecast(city: str, days: int) -> str:
    seed = hashlib.sha256(city.lower().encode()).digest()
    parts = [
        f"day {d + 1} {SKIES[seed[d] % len(SKIES)]} {seed[d + 8] % 30 - 5}°C" for d in range(days)
    ]
    return f"{city}, {days} day{'s' if days > 1 else ''}: " + "; ".join(parts)


class Forecasts(http.server.BaseHTTPRequestHandler):
    key = ""

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        sent = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(sent.encode(), self.key.encode()):
            self._answer(401, "missing or wrong API key")
        elif url.path != "/forecast" or "city" not in query:
            self._answer(404, "try /forecast?city=Paris&days=3")
        else:
            days = query.get("days", ["1"])[0]
            if not days.isdigit() or not 1 <= int(days) <= 7:
                self._answer(400, "days must be 1 to 7")
            else:
                self._answer(200, forecast(query["city"][0], int(days)))

    def _answer(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8088)
    port = parser.parse_args().port
    Forecasts.key = os.environ.get("WEATHER_API_KEY", "dev-weather-key")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Forecasts)
    print(f"weather service on http://127.0.0.1:{port}/forecast", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped: Ctrl-C", file=sys.stderr)


if __name__ == "__main__":
    main()
