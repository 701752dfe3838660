"""What MS-ASCMD says about versions, commands and Status values (no hypothesis here).

``SINCE`` names the request/answer elements the kit generates that a protocol
version before the given one lacks; every other tag it generates exists in all of
12.1, 14.0, 14.1, 16.0 and 16.1. The strategies gate on the version explicitly and
the tests check them against this table, so a slip in either shows.

``STATUS`` gives, per Status tag, the values MS-ASCMD 2.2.3.177 defines for it
(the union over the levels of the command that uses that namespace). From 14.0
on every command may also answer a common status code (MS-ASCMD 2.2.2, 101-185
plus the 16.x additions); 12.1 knows none of them (a 12.1 device gets HTTP 403 or
449 instead), so a Status above 100 in a 12.1 answer is out of spec.
"""
from __future__ import annotations

# "16.1" -> 161; the strategies and the classifier compare these integers.
VERSIONS: tuple[str, ...] = ("12.1", "14.0", "14.1", "16.0", "16.1")


def vnum(version: str) -> int:
    major, _, minor = version.partition(".")
    return int(major) * 10 + int(minor or 0)


# The commands the kit generates requests and answers for (MS-ASCMD 2.2.1), in the
# order `seg-fast fuzz` lists them.
COMMANDS: tuple[str, ...] = (
    "Sync", "FolderSync", "Ping", "ItemOperations", "SendMail", "SmartReply", "SmartForward",
    "MoveItems", "GetItemEstimate", "Search", "Settings", "Provision", "ResolveRecipients",
    "MeetingResponse", "Find",
)
# Commands a version lacks (Find is 16.1's).
FIRST_VERSION: dict[str, int] = {"Find": 161}

# The root element of each command's request and answer.
ROOTS: dict[str, str] = {
    "Sync": "AirSync:Sync", "FolderSync": "FolderHierarchy:FolderSync", "Ping": "Ping:Ping",
    "ItemOperations": "ItemOperations:ItemOperations", "SendMail": "ComposeMail:SendMail",
    "SmartReply": "ComposeMail:SmartReply", "SmartForward": "ComposeMail:SmartForward",
    "MoveItems": "Move:MoveItems", "GetItemEstimate": "GetItemEstimate:GetItemEstimate",
    "Search": "Search:Search", "Settings": "Settings:Settings", "Provision": "Provision:Provision",
    "ResolveRecipients": "ResolveRecipients:ResolveRecipients",
    "MeetingResponse": "MeetingResponse:MeetingResponse", "Find": "Find:Find",
}

# Tags that first appear in a later version than 12.1 (tag -> first version).
SINCE: dict[str, int] = {
    # 14.0
    "AirSync:ConversationMode": 140, "AirSync:HeartbeatInterval": 140,
    "AirSyncBase:Preview": 140, "ItemOperations:Move": 140, "ItemOperations:ConversationId": 140,
    "ItemOperations:DstFldId": 140, "ItemOperations:MoveAlways": 140,
    "ComposeMail:SendMail": 140, "ComposeMail:SmartReply": 140, "ComposeMail:SmartForward": 140,
    "ComposeMail:ClientId": 140, "ComposeMail:Mime": 140, "ComposeMail:SaveInSentItems": 140,
    "ComposeMail:Source": 140, "ComposeMail:FolderId": 140, "ComposeMail:ItemId": 140,
    "ComposeMail:LongId": 140, "ComposeMail:InstanceId": 140, "ComposeMail:ReplaceMime": 140,
    "ComposeMail:Status": 140,
    "Settings:MobileOperator": 140, "Settings:EnableOutboundSMS": 140,
    "ResolveRecipients:Availability": 140, "ResolveRecipients:StartTime": 140,
    "ResolveRecipients:EndTime": 140, "ResolveRecipients:MergedFreeBusy": 140,
    "Email2:ConversationId": 140, "Email2:ConversationIndex": 140,
    "Search:ConversationId": 140,
    # 14.1
    "AirSyncBase:BodyPartPreference": 141, "AirSyncBase:BodyPart": 141,
    "RightsManagement:RightsManagementSupport": 141, "ComposeMail:AccountId": 141,
    "Settings:RightsManagementInformation": 141, "Settings:Accounts": 141, "Settings:Account": 141,
    "Settings:AccountId": 141, "Settings:AccountName": 141, "Settings:UserDisplayName": 141,
    "Settings:SendDisabled": 141, "Settings:PrimarySmtpAddress": 141,
    "ResolveRecipients:Picture": 141, "ResolveRecipients:MaxSize": 141,
    "ResolveRecipients:MaxPictures": 141, "Search:Picture": 141, "Search:MaxSize": 141,
    "Search:MaxPictures": 141, "MeetingResponse:InstanceId": 141,
    # 16.0
    "ComposeMail:Forwardees": 160, "ComposeMail:Forwardee": 160, "ComposeMail:Name": 160,
    "ComposeMail:Email": 160, "MeetingResponse:SendResponse": 160, "Email2:IsDraft": 160,
    "AirSyncBase:Location": 160, "AirSyncBase:InstanceId": 160,
    # 16.1
    "MeetingResponse:ProposedStartTime": 161, "MeetingResponse:ProposedEndTime": 161,
}
# Page 25 (Find) is 16.1's.
NAMESPACE_SINCE: dict[str, int] = {"Find": 161}


# Tags a later version dropped (tag -> last version that has them), as far as the kit
# generates them: GetItemEstimate's Class child is 12.1's (14.0 moved it into Options).
UNTIL: dict[str, int] = {"GetItemEstimate:Class": 121}


def first_version(tag: str) -> int:
    return SINCE.get(tag) or NAMESPACE_SINCE.get(tag.partition(":")[0], 121)


# MS-ASCMD 2.2.2: common status codes (14.0+). 16.x adds a few above 177.
COMMON_STATUS = frozenset(range(101, 186))

STATUS: dict[str, frozenset[int]] = {
    "AirSync:Status": frozenset({1, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16}),
    "FolderHierarchy:Status": frozenset({1, 2, 3, 4, 5, 6, 9, 10, 11, 12}),
    "Ping:Status": frozenset(range(1, 9)),
    "ItemOperations:Status": frozenset(range(1, 19)),
    "Provision:Status": frozenset({1, 2, 3, 4, 5}),
    "Move:Status": frozenset(range(1, 8)),
    "GetItemEstimate:Status": frozenset({1, 2, 3, 4}),
    "Search:Status": frozenset(range(1, 16)),
    "Settings:Status": frozenset(range(1, 8)),
    "ResolveRecipients:Status": frozenset({*range(1, 9), 160, 161, 162, 163}),
    "MeetingResponse:Status": frozenset({1, 2, 3, 4}),
    "ComposeMail:Status": frozenset(),          # common codes only
    "Find:Status": frozenset({1, 2, 3, 4}),
    "GAL:Status": frozenset({1}),
    "AirSyncBase:Status": frozenset({1}),
    "ValidateCert:Status": frozenset(range(1, 18)),
}


def status_ok(tag: str, value: str, version: int) -> bool:
    """Whether ``value`` is a Status the spec defines for ``tag`` at ``version``.
    A Status tag the table does not know is not judged (True)."""
    allowed = STATUS.get(tag)
    if allowed is None:
        return True
    if not value.isdigit() or len(value) > 4:
        return False
    n = int(value)
    return n in allowed or (version >= 140 and n in COMMON_STATUS)
