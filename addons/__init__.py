"""mitmproxy addons; addons/keyrotor.py is the script mitmdump loads (-s)."""
