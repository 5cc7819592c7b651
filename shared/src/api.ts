/**
 * The one entry point to the generated API code (shared/src/gen, made by `buf generate`
 * with ts-proto; never edited by hand). Explicit named re-exports only.
 */
export {
  VolumeFormat,
  KeyState,
  Role,
  HostState,
  CipherSpec,
  KeyVersionInfo,
  Volume,
  Guest,
  Host,
  PageRequest,
  VolumeReport,
} from './gen/virtkm/v1/types.js';
export {
  AgentServiceClient,
  AgentServiceService,
  type AgentServiceServer,
  ConnectRequest,
  ConnectResponse,
  AgentHello,
  DesiredState,
  DesiredGuest,
  DesiredVolume,
  HostReport,
  GuestStatus,
  VolumeStatus,
  GuestPhase,
  VolumePhase,
} from './gen/virtkm/v1/agent_service.js';
export {
  VolumeServiceClient,
  VolumeServiceService,
  type VolumeServiceServer,
  CreateVolumeRequest,
  CreateVolumeResponse,
  GetVolumeRequest,
  GetVolumeResponse,
  ListVolumesRequest,
  ListVolumesResponse,
  DeleteVolumeRequest,
  DeleteVolumeResponse,
} from './gen/virtkm/v1/volume_service.js';
export {
  GuestServiceClient,
  GuestServiceService,
  type GuestServiceServer,
  DefineGuestRequest,
  DefineGuestResponse,
  GetGuestRequest,
  GetGuestResponse,
  ListGuestsRequest,
  ListGuestsResponse,
  MoveGuestRequest,
  MoveGuestResponse,
  DeleteGuestRequest,
  DeleteGuestResponse,
} from './gen/virtkm/v1/guest_service.js';
export {
  HostServiceClient,
  HostServiceService,
  type HostServiceServer,
  CreateEnrollmentTokenRequest,
  CreateEnrollmentTokenResponse,
  GetHostRequest,
  GetHostResponse,
  ListHostsRequest,
  ListHostsResponse,
  RevokeHostRequest,
  RevokeHostResponse,
} from './gen/virtkm/v1/host_service.js';
export {
  EnrollmentServiceClient,
  EnrollmentServiceService,
  type EnrollmentServiceServer,
  EnrollRequest,
  EnrollResponse,
} from './gen/virtkm/v1/enrollment_service.js';
export {
  CredentialServiceClient,
  CredentialServiceService,
  type CredentialServiceServer,
  IssueCredentialRequest,
  IssueCredentialResponse,
  RevokeCredentialRequest,
  RevokeCredentialResponse,
} from './gen/virtkm/v1/credential_service.js';
export {
  KeyServiceClient,
  KeyServiceService,
  type KeyServiceServer,
  ReleaseKeysRequest,
  ReleaseKeysResponse,
  SealedKeyPacket,
  KeyPacket,
} from './gen/virtkm/v1/key_service.js';
export {
  AuditServiceClient,
  AuditServiceService,
  type AuditServiceServer,
  AuditEvent,
  ListAuditEventsRequest,
  ListAuditEventsResponse,
  VerifyAuditLogRequest,
  VerifyAuditLogResponse,
} from './gen/virtkm/v1/audit_service.js';
