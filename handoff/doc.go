// Package handoff moves a running VM from one cloudlet to another. On the
// source it reads QEMU's own precopy migration stream while the VM runs,
// keeps of the guest's memory and disk only what differs from what the
// destination already has (the VM's overlay, its parents and the base),
// sends that in compressed segments whose codec follows the measured link
// and CPU, and, once QEMU has stopped the VM, writes the rest and the
// device state as a layered overlay on the VM's overlay. The destination
// resumes from that layer as from any overlay, with the segments sent
// ahead staged locally.
package handoff
