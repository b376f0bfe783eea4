"""NICE CXone Virtual Agent Hub "Custom Exchange Endpoint" wire format, field for field.

From NICE's OpenAPI file for `/api/v1/virtualAgentIntegration/externalproviderexchange`
(`ExternalIntegrationBotExchangeRequest` in, `BotExchangeResponse` out). The request tolerates
fields a newer CXone may add (they are ignored); the response is built strictly and serialised
without nulls, because the spec's `$ref` properties are not nullable.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class UserInputType(str, Enum):
    NO_INPUT = "NO_INPUT"
    TEXT = "TEXT"
    BASE64_ENCODED_G711_ULAW_WAV_FILE = "BASE64_ENCODED_G711_ULAW_WAV_FILE"
    USER_INPUT_ARCHIVED_AS_SPECIFIED = "USER_INPUT_ARCHIVED_AS_SPECIFIED"
    USER_ENDED_SESSION = "USER_ENDED_SESSION"
    AUTOMATED_TEXT = "AUTOMATED_TEXT"
    DTMF_AS_TEXT = "DTMF_AS_TEXT"


USER_INPUT_TYPES = list(UserInputType)  # position = the integer CXone may send instead


class BotExchangeBranch(str, Enum):
    DoNotBegin = "DoNotBegin"
    PromptAndCollectNextResponse = "PromptAndCollectNextResponse"
    ReturnControlToScript = "ReturnControlToScript"
    EndContact = "EndContact"
    AudioInputUntranscribeable = "AudioInputUntranscribeable"
    Error = "Error"
    DTMFBreakout = "DTMFBreakout"
    UserInputTimeout = "UserInputTimeout"
    UserInputNotUnderstood = "UserInputNotUnderstood"


class BotLoopErrorBehavior(str, Enum):
    ReturnControlToScriptThroughErrorBranch = "ReturnControlToScriptThroughErrorBranch"
    EndContact = "EndContact"


class UserInputCollectType(str, Enum):
    DO_NOT_COLLECT_USER_RESPONSE = "DO_NOT_COLLECT_USER_RESPONSE"
    SEND_UTTERANCE_AUDIO = "SEND_UTTERANCE_AUDIO"
    SEND_DTMF_ONLY_AS_TEXT = "SEND_DTMF_ONLY_AS_TEXT"


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- request ----------------------------------------------------------------------------------


class ActionExecutionInfo(_In):
    contactId: int | None = None
    busNo: int | None = None
    requestId: int | None = None
    actionType: str | None = None
    actionId: int | None = None
    scriptName: str | None = None


class SystemTelemetryData(_In):
    consumerProcessHost: str | None = None
    consumerProcessName: str | None = None
    consumerProcessVersion: str | None = None
    inContactClusterAlias: str | None = None
    inContactScriptEngineHost: str | None = None
    consumerMetaData: dict[str, str] | None = None


class ExternalIntegrationBotExchangeRequest(_In):
    virtualAgentId: str | None = None
    botConfig: Any = None
    userInput: str | None = Field(None, max_length=20_000)
    userInputType: UserInputType | None = None
    executionInfo: ActionExecutionInfo | None = None
    systemTelemetryData: SystemTelemetryData | None = None
    base64wavFile: str | None = None
    botSessionState: Any = None
    customPayload: Any = None
    mediaType: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _not_the_tutorials_body(cls, data: object) -> object:
        """The CXone tutorial's webhook took `{botId, sessionId}`, a body no CXone sends. Read
        as an exchange it would be a silent no-input turn (every field here is optional), so a
        client written from the tutorial is told instead."""
        if (
            isinstance(data, dict)
            and ("botId" in data or "sessionId" in data)
            and not any(name in data for name in _EXCHANGE_FIELDS)
        ):
            raise ValueError(
                "botId/sessionId is the CXone tutorial's own body, which CXone never sends: "
                "this endpoint takes Virtual Agent Hub's exchange request (userInput, "
                "userInputType, executionInfo, botSessionState, ...); register it in CXone as "
                "a Custom Exchange Endpoint (see docs/cxone.md)"
            )
        return data

    @field_validator("userInputType", mode="before")
    @classmethod
    def _name_or_position(cls, value: object) -> object:
        """CXone sends the enum as its name or as its integer position (0-6): accept both."""
        if isinstance(value, bool):
            raise ValueError("userInputType must be a name or an integer 0-6")
        if isinstance(value, int):
            if 0 <= value < len(USER_INPUT_TYPES):
                return USER_INPUT_TYPES[value]
            raise ValueError(f"userInputType {value} is not an integer from 0 to 6")
        if isinstance(value, str) and value.isdigit():
            return cls._name_or_position(int(value))
        if isinstance(value, str):
            return value.strip().upper()
        return value

    @property
    def input_type(self) -> UserInputType:
        """Missing type: text when there is text, else no input."""
        if self.userInputType is not None:
            return self.userInputType
        return UserInputType.TEXT if (self.userInput or "").strip() else UserInputType.NO_INPUT

    @property
    def contact_id(self) -> str | None:
        info = self.executionInfo
        return str(info.contactId) if info and info.contactId is not None else None


_EXCHANGE_FIELDS = tuple(ExternalIntegrationBotExchangeRequest.model_fields)

# --- response ---------------------------------------------------------------------------------


class PromptDefinition(_Out):
    transcript: str | None = None
    base64EncodedG711ulawWithWavHeader: str | None = None
    audioFilePath: str | None = None
    textToSpeech: str | None = None
    mediaSpecificObject: Any = None


class PromptSequence(_Out):
    prompts: list[PromptDefinition] | None = None

    @classmethod
    def say(cls, text: str) -> PromptSequence:
        return cls(prompts=[PromptDefinition(transcript=text, textToSpeech=text)])


class IntentInfo(_Out):
    intent: str | None = None
    context: str | None = None
    intentConfidence: float | None = None
    lastUserUtterance: str | None = None
    slots: dict[str, Any] | None = None


class SilenceRules(_Out):
    engageComfortSequence: bool | None = None
    botResponseDelayTolerance: int | None = None
    comfortPromptSequence: PromptSequence | None = None
    millisecondsToWaitForUserResponse: int | None = None


class CollectDtmfRules(_Out):
    detectDtmf: bool | None = None
    clearDigits: bool | None = None
    terminationCharacters: str | None = None
    stripTerminator: bool | None = None
    interDigitTimeoutMilliseconds: int | None = None
    maxDigits: int | None = None


class PromptBargeConfiguration(_Out):
    enableSpeakerBarge: bool | None = None


class AudioCollectionRules(_Out):
    collectionType: UserInputCollectType | None = None
    dtmfRules: CollectDtmfRules | None = None
    bargeConfiguration: PromptBargeConfiguration | None = None


class PromptBehaviors(_Out):
    silenceRules: SilenceRules | None = None
    audioCollectionRules: AudioCollectionRules | None = None


class BotErrorDetails(_Out):
    errorBehavior: BotLoopErrorBehavior | None = None
    errorPromptSequence: PromptSequence | None = None
    systemErrorMessage: str | None = None


class BotExchangeResponse(_Out):
    branchName: BotExchangeBranch
    nextPromptSequence: PromptSequence | None = None
    intentInfo: IntentInfo | None = None
    nextPromptBehaviors: PromptBehaviors | None = None
    customPayload: dict[str, Any] | None = None
    errorDetails: BotErrorDetails | None = None
    botSessionState: Any = None

    def wire(self) -> dict[str, Any]:
        """The JSON body: no nulls (the spec's object references are not nullable)."""
        return self.model_dump(mode="json", exclude_none=True)
