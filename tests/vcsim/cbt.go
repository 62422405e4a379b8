// Simulator extensions: Changed Block Tracking on the real disk files, and a count of
// the bytes the datastore file server sends.
//
// govmomi's simulator has no QueryChangedDiskAreas, and a VM object cannot be wrapped
// (its snapshots assert the concrete type), so the extension sits in front of the SOAP
// endpoint:
//   - CreateSnapshot_Task on a VM with changeTrackingEnabled: before the simulator takes
//     the snapshot, every disk's data file (the `-flat.vmdk` next to the descriptor when
//     there is one) is hashed in blocks of cbtBlock bytes (a 96-bit sum: CRC-32C and a
//     64-bit maphash, both fast: a disk of a GiB takes a fraction of a second) and
//     recorded under a new change id, which becomes the disk backing's changeId (the
//     snapshot's config shares it).
//   - QueryChangedDiskAreas(snapshot, deviceKey, startOffset, changeId): the blocks whose
//     sums differ between changeId and the disk's latest change id (that of the newest
//     snapshot: the one the query names, as rounds take one snapshot at a time); "*"
//     means every block holding data (not all zero). An unknown change id is an
//     InvalidArgument fault.
//
// GET /hypersdk/folder-bytes answers the number of body bytes served by GET /folder/...
// since the simulator started.
package main

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"hash/crc32"
	"hash/maphash"
	"io"
	"io/ioutil"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/vmware/govmomi/simulator"
	"github.com/vmware/govmomi/vim25/types"
)

const cbtBlock = 64 << 10

type extensions struct {
	next        http.Handler
	folderBytes int64
	mu          sync.Mutex
	changes     map[string]map[string][]blockSum // change id -> data file -> block sums
	latest      map[string]string                // data file -> its newest change id
	counter     int
}

type blockSum struct {
	crc  uint32
	hash uint64
}

var (
	castagnoli = crc32.MakeTable(crc32.Castagnoli)
	seed       = maphash.MakeSeed()
)

func sumOf(block []byte) blockSum {
	var h maphash.Hash
	h.SetSeed(seed)
	_, _ = h.Write(block)
	return blockSum{crc32.Checksum(block, castagnoli), h.Sum64()}
}

func newExtensions(next http.Handler) http.Handler {
	return &extensions{next: next, changes: map[string]map[string][]blockSum{},
		latest: map[string]string{}}
}

func (x *extensions) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == "/hypersdk/folder-bytes":
		fmt.Fprintf(w, "%d\n", atomic.LoadInt64(&x.folderBytes))
	case strings.HasPrefix(r.URL.Path, "/folder/") && r.Method == http.MethodGet:
		x.next.ServeHTTP(&countingWriter{w, &x.folderBytes}, r)
	case r.Method == http.MethodPost && strings.HasPrefix(r.URL.Path, "/sdk"):
		x.serveSDK(w, r)
	default:
		x.next.ServeHTTP(w, r)
	}
}

type countingWriter struct {
	http.ResponseWriter
	count *int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.ResponseWriter.Write(p)
	atomic.AddInt64(c.count, int64(n))
	return n, err
}

// The fields of the two requests the extension reads (local names, any namespace).
type soapRequest struct {
	Snapshot *struct {
		This string `xml:"_this"`
	} `xml:"Body>CreateSnapshot_Task"`
	Query *struct {
		This        string `xml:"_this"`
		DeviceKey   int32  `xml:"deviceKey"`
		StartOffset int64  `xml:"startOffset"`
		ChangeID    string `xml:"changeId"`
	} `xml:"Body>QueryChangedDiskAreas"`
}

func (x *extensions) serveSDK(w http.ResponseWriter, r *http.Request) {
	body, err := ioutil.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.Body = ioutil.NopCloser(bytes.NewReader(body))
	var req soapRequest
	if bytes.Contains(body, []byte("CreateSnapshot_Task")) ||
		bytes.Contains(body, []byte("QueryChangedDiskAreas")) {
		_ = xml.Unmarshal(body, &req)
	}
	switch {
	case req.Query != nil:
		x.queryChangedDiskAreas(w, req.Query.This, req.Query.DeviceKey, req.Query.StartOffset,
			req.Query.ChangeID)
		return
	case req.Snapshot != nil:
		x.recordChanges(req.Snapshot.This)
	}
	x.next.ServeHTTP(w, r)
}

func findVM(id string) *simulator.VirtualMachine {
	ref := types.ManagedObjectReference{Type: "VirtualMachine", Value: id}
	vm, _ := simulator.Map.Get(ref).(*simulator.VirtualMachine)
	return vm
}

// dataFile is the local file holding a disk's data: `[ds] dir/x.vmdk` -> the datastore's
// directory + dir/x-flat.vmdk when that exists, else dir/x.vmdk.
func dataFile(fileName string) (string, error) {
	name := strings.TrimPrefix(fileName, "[")
	parts := strings.SplitN(name, "] ", 2)
	if len(parts) != 2 {
		return "", fmt.Errorf("not a datastore path: %q", fileName)
	}
	for _, entity := range simulator.Map.All("Datastore") {
		ds := entity.(*simulator.Datastore)
		if ds.Name != parts[0] {
			continue
		}
		local := filepath.Join(ds.Info.GetDatastoreInfo().Url, parts[1])
		flat := strings.TrimSuffix(local, ".vmdk") + "-flat.vmdk"
		if _, err := os.Stat(flat); err == nil {
			return flat, nil
		}
		return local, nil
	}
	return "", fmt.Errorf("no datastore %q", parts[0])
}

func blockSums(path string) ([]blockSum, error) {
	file, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	var sums []blockSum
	buf := make([]byte, cbtBlock)
	for {
		n, err := io.ReadFull(file, buf)
		if n > 0 {
			sums = append(sums, sumOf(buf[:n]))
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return sums, nil
		}
		if err != nil {
			return nil, err
		}
	}
}

func disksOf(vm *simulator.VirtualMachine) []*types.VirtualDisk {
	var disks []*types.VirtualDisk
	for _, device := range vm.Config.Hardware.Device {
		if disk, ok := device.(*types.VirtualDisk); ok {
			disks = append(disks, disk)
		}
	}
	return disks
}

// recordChanges hashes every disk of a VM with change tracking on and gives it a new
// change id, just before the simulator snapshots it.
func (x *extensions) recordChanges(vmID string) {
	vm := findVM(vmID)
	if vm == nil {
		return
	}
	simulator.Map.WithLock(vm, func() {
		if vm.Config.ChangeTrackingEnabled == nil || !*vm.Config.ChangeTrackingEnabled {
			return
		}
		x.mu.Lock()
		defer x.mu.Unlock()
		x.counter++
		id := fmt.Sprintf("52 hypersdk-cbt/%d", x.counter)
		recorded := map[string][]blockSum{}
		for _, disk := range disksOf(vm) {
			backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo)
			if !ok {
				continue
			}
			path, err := dataFile(backing.FileName)
			if err != nil {
				continue
			}
			if sums, err := blockSums(path); err == nil {
				recorded[path] = sums
				x.latest[path] = id
				backing.ChangeId = id
			}
		}
		x.changes[id] = recorded
	})
}

type extent struct{ start, length int64 }

func (x *extensions) changedAreas(vmID string, key int32, changeID string) ([]extent, int64, string) {
	vm := findVM(vmID)
	if vm == nil {
		return nil, 0, "_this"
	}
	var path string
	for _, disk := range disksOf(vm) {
		if backing, ok := disk.Backing.(*types.VirtualDiskFlatVer2BackingInfo); ok && disk.Key == key {
			path, _ = dataFile(backing.FileName)
		}
	}
	if path == "" {
		return nil, 0, "deviceKey"
	}
	x.mu.Lock()
	old, known := x.changes[changeID][path]
	current, snapshotted := x.changes[x.latest[path]][path]
	x.mu.Unlock()
	if changeID != "*" && !known {
		return nil, 0, "changeId"
	}
	info, err := os.Stat(path)
	if !snapshotted || err != nil {
		return nil, 0, "snapshot"
	}
	zero := sumOf(make([]byte, cbtBlock))
	var areas []extent
	for i, hash := range current {
		changed := hash != zero
		if changeID != "*" {
			changed = i >= len(old) || old[i] != hash
		}
		if !changed {
			continue
		}
		start := int64(i) * cbtBlock
		length := int64(cbtBlock)
		if start+length > info.Size() {
			length = info.Size() - start
		}
		if n := len(areas); n > 0 && areas[n-1].start+areas[n-1].length == start {
			areas[n-1].length += length
		} else {
			areas = append(areas, extent{start, length})
		}
	}
	return areas, info.Size(), ""
}

const soapHead = `<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" ` +
	`xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" ` +
	`xmlns:xsd="http://www.w3.org/2001/XMLSchema" ` +
	`xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>`
const soapTail = `</soapenv:Body></soapenv:Envelope>`

func (x *extensions) queryChangedDiskAreas(w http.ResponseWriter, vmID string, key int32,
	startOffset int64, changeID string) {
	areas, size, bad := x.changedAreas(vmID, key, changeID)
	w.Header().Set("Content-Type", "text/xml; charset=utf-8")
	var out strings.Builder
	out.WriteString(soapHead)
	if bad != "" {
		w.WriteHeader(http.StatusInternalServerError)
		fmt.Fprintf(&out, `<soapenv:Fault><faultcode>ServerFaultCode</faultcode>`+
			`<faultstring>A specified parameter was not correct: %s</faultstring><detail>`+
			`<InvalidArgumentFault xmlns="urn:vim25" xsi:type="InvalidArgument">`+
			`<invalidProperty>%s</invalidProperty></InvalidArgumentFault></detail>`+
			`</soapenv:Fault>`, bad, bad)
	} else {
		fmt.Fprintf(&out, `<QueryChangedDiskAreasResponse xmlns="urn:vim25"><returnval>`+
			`<startOffset>%d</startOffset><length>%d</length>`, startOffset, size-startOffset)
		for _, area := range areas {
			if area.start+area.length <= startOffset {
				continue
			}
			fmt.Fprintf(&out, `<changedArea><start>%d</start><length>%d</length></changedArea>`,
				area.start, area.length)
		}
		out.WriteString(`</returnval></QueryChangedDiskAreasResponse>`)
	}
	out.WriteString(soapTail)
	_, _ = io.WriteString(w, out.String())
}
