"""What vulture cannot see being used: code reached by name at run time, not by a call
in the source, and the client library's public API, called by sensor code elsewhere.
Passed to vulture beside the code it checks:

    vulture --min-confidence 60 appliance hw vulture_whitelist.py

Each entry says who uses it; anything else vulture reports is dead: delete it or use
it. Vulture only parses this file; nothing imports it.
"""

# ruff: noqa: B018 - the bare names and attributes below are the whitelist's entries

from paho.mqtt.client import Client as PahoClient

from appliance.client import Client
from appliance.net.server import Server
from appliance.subscribers.archive import ArchiveSubscriber
from appliance.subscribers.cloud import CloudSubscriber
from appliance.subscribers.example import JsonlFile
from appliance.subscribers.index import IndexSubscriber
from appliance.subscribers.inference import InferenceSubscriber
from appliance.subscribers.manager import install
from appliance.subscribers.mqtt import MqttSubscriber

# Subscriber classes: the runner imports them by the "module:Class" strings of its
# BUILTIN table or of a config's `type` (runner.load_class), never by name in code.
ArchiveSubscriber
CloudSubscriber
IndexSubscriber
InferenceSubscriber
MqttSubscriber
JsonlFile  # the example plug-in: type = "appliance.subscribers.example:JsonlFile"

# MqttSubscriber sets these on paho's client, which calls or reads them by name.
PahoClient.connect_timeout
PahoClient.on_connect
PahoClient.on_publish
PahoClient.on_disconnect

# Set by the subscriber manager when there are subscribers; telemetry/metrics.py reads it
# with getattr(server, "subscriber_status", dict).
Server.subscriber_status

# Called from appliance/app.py, outside appliance/subscribers: named for the subscribers'
# own check, which runs vulture over that folder alone.
install

# The client library's public API (README, "Client library"): sensor code calls it.
Client.ping  # keeps a connection alive across a long quiet spell (idle_timeout)
