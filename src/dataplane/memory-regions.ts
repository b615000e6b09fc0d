/**
 * The guest memory table as the data plane sees it: plain Numbers, structured-cloneable so the control
 * plane can post it to workers. Mappings are process-wide, so a host address is valid on every thread.
 */
export interface RegionLayout {
  /** Guest-physical address of the first byte. */
  guestPhysAddr: number;
  size: number;
  /** The front-end's virtual address of the first byte (ring addresses arrive in this space). */
  userAddr: number;
  /** Where the first byte is mapped in this process. */
  hostAddr: number;
}

/** Largest guest address a Number represents exactly; anything above cannot be in any table. */
export const MAX_GUEST_ADDRESS = Number.MAX_SAFE_INTEGER;
