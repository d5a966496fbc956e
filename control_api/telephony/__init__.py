"""Phone calls through Twilio: webhook signatures, TwiML, the tenant's Twilio account, the REST
client for hang-up and transfer, and the signed conversation URL prefetched for a phone call."""
