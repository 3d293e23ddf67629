"""The protocol: every message that crosses a site boundary, typed, with its record keys and version.

keys       every record, field, node-config and state key, the message types, and PROTOCOL_VERSION
version    the version check both sides apply to every message (ProtocolVersionError names both versions)
errors     ContractError: a message that breaks the contract; the error codes of a site's error replies
messages   the round config and a site's training / evaluation replies
secagg     the secure-aggregation messages (the crypto is magnet_core.federation.secagg)
prepare    the federated preparation's messages
wire       the flat model and its layout
release    the form of what a site releases about its evaluation
enrolment  what the coordinator checks replies against
worker     the site worker link's frame headers (the bundle's ClientApp -> the site's own worker)
"""
