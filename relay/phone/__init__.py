"""Phone calls: Twilio Media Streams at ``/twilio/stream`` carried to the agent by a CallBridge."""
