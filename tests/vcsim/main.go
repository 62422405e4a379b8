// vcsim-hypersdk: govmomi's vCenter simulator on loopback, for tests, benchmarks and the demo.
//
// It prints the SDK URL (with the default user:pass credentials) on stdout and,
// with -url-file, writes it to that file once the server listens. It runs until
// it is killed (SIGTERM/SIGINT), then removes the simulator's temporary datastores.
//
// Simulator extensions (cbt.go): Changed Block Tracking backed by the real disk files
// the datastores hold (QueryChangedDiskAreas), and a count of the bytes the datastore
// file server sends (GET /hypersdk/folder-bytes).
package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"io/ioutil"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"

	"github.com/vmware/govmomi/simulator"
	_ "github.com/vmware/govmomi/vapi/simulator" // the vAPI REST endpoint (/rest): tags
)

func main() {
	datacenters := flag.Int("dc", 1, "number of datacenters")
	clusters := flag.Int("cluster", 1, "clusters per datacenter")
	clusterHosts := flag.Int("cluster-host", 1, "hosts per cluster")
	hosts := flag.Int("host", 1, "standalone hosts per datacenter")
	vms := flag.Int("vm", 2, "virtual machines per host and per cluster")
	datastores := flag.Int("ds", 1, "local datastores (LocalDS_0, ...); VMs are on the first")
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on (loopback only)")
	urlFile := flag.String("url-file", "", "write the SDK URL to this file when ready")
	useTLS := flag.Bool("tls", false, "serve https with a self-signed certificate")
	username := flag.String("username", "user", "the one user name the simulator accepts")
	password := flag.String("password", "pass", "that user's password")
	flag.Parse()

	model := simulator.VPX()
	model.Datacenter = *datacenters
	model.Cluster = *clusters
	model.ClusterHost = *clusterHosts
	model.Host = *hosts
	model.Machine = *vms
	model.Datastore = *datastores
	if err := model.Create(); err != nil {
		log.Fatalf("creating the simulator model: %v", err)
	}
	defer model.Remove()

	// A user other than simulator.DefaultLogin makes the simulator check passwords.
	model.Service.Listen = &url.URL{Host: *listen, User: url.UserPassword(*username, *password)}
	if *useTLS {
		model.Service.TLS = new(tls.Config)
	}
	model.Service.RegisterEndpoints = true
	server := model.Service.NewServer()
	defer server.Close()
	server.Config.Handler = newExtensions(server.Config.Handler)

	sdkURL := server.URL.String()
	fmt.Println(sdkURL)
	if *urlFile != "" {
		tmp := *urlFile + ".tmp"
		if err := ioutil.WriteFile(tmp, []byte(sdkURL+"\n"), 0600); err != nil {
			log.Fatalf("writing %s: %v", tmp, err)
		}
		if err := os.Rename(tmp, *urlFile); err != nil {
			log.Fatalf("renaming %s: %v", tmp, err)
		}
	}

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
}
